//! The delivery engine: per-webhook workers with bounded queues, retries and reports.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use foldhash::HashMap;
use k8s_openapi::jiff::Timestamp;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::id::DeliveryId;
use super::pace::{self, Gathering};
use super::queue::{JobQueue, Queued};
use super::send::{AttemptClass, AttemptResult, Delivery, send};
use super::target::Target;
use crate::metrics::{Metrics, WebhookLabels, WebhookMetrics};
use crate::routing::ObjectKey;
use crate::store::{DeliveryRecord, Store, StoreError};

/// How failed attempts are retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Longest delay between attempts (also caps `Retry-After`).
    pub max_backoff: Duration,
    /// Give up once the next attempt would start later than this after the first one.
    pub max_elapsed: Duration,
    /// Give up after this many attempts.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_elapsed: Duration::from_secs(3600),
            max_attempts: 30,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`: exponential with equal jitter, or the endpoint's
    /// `Retry-After` when it asked for one (capped at `max_backoff`).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(self.max_backoff);
        }
        let exponent = attempt.saturating_sub(1).min(20);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff);
        let half = base / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }
}

/// Limits of the engine.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Deliveries waiting per webhook; past it, new deliveries to that webhook are dropped.
    pub queue_capacity: usize,
    /// Deliveries pending across all webhooks; past it, the receiver answers 503.
    pub max_pending: usize,
    /// Retries.
    pub retry: RetryPolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            queue_capacity: 1000,
            max_pending: 20_000,
            retry: RetryPolicy::default(),
        }
    }
}

/// The final outcome of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReportOutcome {
    /// The endpoint answered 2xx.
    Succeeded,
    /// Retries exhausted or a final error.
    Failed,
    /// Never sent: the webhook's queue was full, or the webhook went away.
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

/// What became of one delivery, handed to every [`DeliveryObserver`].
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryReport {
    /// The webhook.
    pub webhook: ObjectKey,
    /// The delivery's id (its Idempotency-Key).
    pub delivery_id: DeliveryId,
    /// A test message.
    pub test: bool,
    /// Number of alerts it carried.
    pub alerts: usize,
    /// Attempts made.
    pub attempts: u32,
    /// Final outcome.
    pub outcome: ReportOutcome,
    /// The last HTTP status, if the endpoint answered.
    pub http_status: Option<u16>,
    /// A human-readable summary.
    pub message: String,
    /// Latency of the last attempt.
    #[serde(with = "humantime_serde_ms")]
    pub latency: Duration,
    /// When it ended.
    pub finished_at: Timestamp,
}

mod humantime_serde_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }
}

/// Receives every delivery report: metrics, status writers, delivery records.
pub trait DeliveryObserver: Send + Sync + 'static {
    /// Called once per finished delivery or test.
    fn report(&self, report: &DeliveryReport);
}

/// The receiver's answer when Herald holds as many pending deliveries as it may.
#[derive(Debug, thiserror::Error)]
#[error("Herald holds {pending} pending deliveries, its limit; retry later")]
pub struct Overloaded {
    /// The limit that was reached.
    pub pending: usize,
}

/// Why deliveries were not accepted; nothing was queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Too many deliveries pending, or Herald is stopping.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// The store could not keep them.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a recorded delivery could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No record with that id.
    #[error("no delivery record {0}")]
    NotFound(String),
    /// The record holds no content (successes keep it only with --record-bodies).
    #[error(
        "delivery {0} was recorded without its content; only dead letters, or every delivery with --record-bodies, can be replayed"
    )]
    NoContent(String),
    /// The webhook cannot deliver now.
    #[error("webhook {0} is not ready to deliver")]
    NotReady(ObjectKey),
    /// Submitting failed.
    #[error(transparent)]
    Submit(#[from] SubmitError),
}

/// What `submit` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmitSummary {
    /// Deliveries queued.
    pub queued: usize,
    /// Deliveries dropped because their webhook's queue was full or it went away.
    pub dropped: usize,
}

/// Room for a number of deliveries under the global pending limit, given back when dropped
/// unless they were submitted.
#[derive(Debug)]
pub struct Admission {
    permits: OwnedSemaphorePermit,
}

struct Job {
    delivery: Arc<Delivery>,
    _permit: OwnedSemaphorePermit,
}

/// One webhook's delivery state. Its task (see [`run_worker`]) runs only while the queue holds
/// something: an idle webhook costs this struct and its queue, not a task.
struct WorkerState {
    key: ObjectKey,
    /// The current settings, read at the start of every attempt (queued deliveries use new
    /// settings from their next attempt on: Secret rotation needs no restart).
    target: RwLock<Arc<Target>>,
    queue: Arc<JobQueue<Job>>,
    /// Cancelled when the webhook goes away or Herald stops.
    cancel: CancellationToken,
    /// Made at the first delivery: idle webhooks export no series.
    metrics: OnceLock<WebhookMetrics>,
    /// The circuit breaker's count of failed attempts in a row, kept between tasks.
    failures: AtomicU32,
}

impl WorkerState {
    fn target(&self) -> Arc<Target> {
        // A poisoned lock still holds a whole Arc.
        self.target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_target(&self, target: Arc<Target>) {
        *self.target.write().unwrap_or_else(|e| e.into_inner()) = target;
    }

    fn metrics(&self, shared: &Shared) -> &WebhookMetrics {
        self.metrics
            .get_or_init(|| shared.metrics.webhook(&WebhookLabels::from(&self.key)))
    }
}

struct Shared {
    config: EngineConfig,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    /// Herald is stopping: unfinished deliveries stay pending in the store for the next start.
    stopping: CancellationToken,
    observers: RwLock<Vec<Arc<dyn DeliveryObserver>>>,
}

impl Shared {
    fn report(
        &self,
        report: DeliveryReport,
        delivery: &Arc<Delivery>,
        handles: Option<&WebhookMetrics>,
    ) {
        match (report.outcome, handles) {
            (ReportOutcome::Succeeded, Some(handles)) => {
                handles.succeeded.inc();
            }
            _ => self
                .metrics
                .delivery(&report.webhook, report.outcome.as_str()),
        };
        let record = DeliveryRecord {
            id: report.delivery_id,
            webhook: report.webhook.clone(),
            time: report.finished_at,
            alerts: report.alerts,
            attempts: report.attempts,
            outcome: report.outcome,
            http_status: report.http_status,
            latency_ms: u64::try_from(report.latency.as_millis()).unwrap_or(u64::MAX),
            error: if report.outcome == ReportOutcome::Succeeded {
                String::new()
            } else {
                report.message.clone()
            },
            test: report.test,
            // Copy the content only when the record will keep it.
            delivery: self
                .store
                .keeps_content(report.outcome)
                .then(|| delivery.clone()),
        };
        if let Err(e) = self.store.finish(record) {
            tracing::error!(delivery = %report.delivery_id, "cannot record the delivery: {e}");
        }
        match report.outcome {
            ReportOutcome::Succeeded => tracing::debug!(
                webhook = %report.webhook, delivery = %report.delivery_id,
                attempts = report.attempts, status = ?report.http_status, "delivered"
            ),
            _ => tracing::warn!(
                webhook = %report.webhook, delivery = %report.delivery_id, outcome = ?report.outcome,
                attempts = report.attempts, status = ?report.http_status, error = %report.message,
                "delivery failed"
            ),
        }
        if let Ok(observers) = self.observers.read() {
            for observer in observers.iter() {
                observer.report(&report);
            }
        }
    }

    fn dropped(&self, delivery: &Arc<Delivery>, why: &str) {
        self.report(
            DeliveryReport {
                webhook: delivery.webhook.clone(),
                delivery_id: delivery.id,
                test: delivery.test,
                alerts: delivery.alerts.len(),
                attempts: 0,
                outcome: ReportOutcome::Dropped,
                http_status: None,
                message: why.to_string(),
                latency: Duration::ZERO,
                finished_at: Timestamp::now(),
            },
            delivery,
            None,
        );
    }
}

/// The delivery engine. Cheap to clone; every clone drives the same workers.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    workers: Arc<Mutex<HashMap<ObjectKey, Arc<WorkerState>>>>,
    pending: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A new engine with no webhooks, keeping deliveries in `store`.
    pub fn new(config: EngineConfig, metrics: Arc<Metrics>, store: Arc<Store>) -> Self {
        let shutdown = CancellationToken::new();
        Engine {
            pending: Arc::new(Semaphore::new(config.max_pending)),
            shared: Arc::new(Shared {
                config,
                metrics,
                store,
                stopping: shutdown.clone(),
                observers: RwLock::new(Vec::new()),
            }),
            workers: Arc::default(),
            shutdown,
            tasks: TaskTracker::new(),
        }
    }

    /// Adds an observer of delivery reports.
    pub fn observe(&self, observer: Arc<dyn DeliveryObserver>) {
        if let Ok(mut observers) = self.shared.observers.write() {
            observers.push(observer);
        }
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Arc<WorkerState>>> {
        // A worker map poisoned by a panic elsewhere is still consistent: each entry is replaced whole.
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs or replaces a webhook's settings. Queued deliveries keep their place and use the
    /// new settings from their next attempt on (Secret rotation needs no restart).
    pub fn upsert(&self, target: Target) {
        let key = target.key.clone();
        let target = Arc::new(target);
        let mut workers = self.workers();
        if let Some(worker) = workers.get(&key) {
            worker.set_target(target);
            return;
        }
        let state = WorkerState {
            key: key.clone(),
            target: RwLock::new(target),
            queue: JobQueue::new(self.shared.config.queue_capacity),
            cancel: self.shutdown.child_token(),
            metrics: OnceLock::new(),
            failures: AtomicU32::new(0),
        };
        workers.insert(key, Arc::new(state));
    }

    /// Starts the task that drains a webhook's queue (called by whoever queued into an idle one).
    fn start(&self, worker: &Arc<WorkerState>) {
        self.tasks
            .spawn(run_worker(self.shared.clone(), worker.clone()));
    }

    /// Stops delivering to a webhook (deleted, disabled or no longer ready); what it had queued
    /// is dropped and reported as such.
    pub fn remove(&self, key: &ObjectKey) {
        let Some(worker) = self.workers().remove(key) else {
            return;
        };
        worker.cancel.cancel();
        // A running task drops what is queued itself; otherwise the queue is empty, but make sure.
        give_up_queued(&self.shared, &worker, worker.queue.close());
        self.shared.metrics.forget_webhook_gauges(key);
    }

    /// Whether a webhook has a worker.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.workers().contains_key(key)
    }

    /// The current settings of a webhook.
    pub fn target(&self, key: &ObjectKey) -> Option<Arc<Target>> {
        self.workers().get(key).map(|w| w.target())
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// The refusal when there is no room (or Herald is stopping).
    fn overloaded(&self) -> Overloaded {
        Overloaded {
            pending: self.shared.config.max_pending,
        }
    }

    /// Room for `count` deliveries under the global limit, taken now or not at all.
    pub fn try_admit(&self, count: usize) -> Result<Admission, Overloaded> {
        if self.shutdown.is_cancelled() {
            return Err(self.overloaded());
        }
        let count = u32::try_from(count).map_err(|_| self.overloaded())?;
        let permits = self
            .pending
            .clone()
            .try_acquire_many_owned(count)
            .map_err(|_| self.overloaded())?;
        Ok(Admission { permits })
    }

    /// Room for `count` deliveries under the global limit, waiting up to `wait` for deliveries
    /// in flight to finish. Waiting once costs less than a refusal that the sender answers by
    /// sending the whole batch again. More than the limit itself, or Herald stopping, fails at
    /// once.
    pub async fn admit(&self, count: usize, wait: Duration) -> Result<Admission, Overloaded> {
        match self.try_admit(count) {
            Ok(admission) => return Ok(admission),
            Err(overloaded) if wait.is_zero() || count > self.shared.config.max_pending => {
                return Err(overloaded);
            }
            Err(_) => {}
        }
        let count = u32::try_from(count).map_err(|_| self.overloaded())?;
        tokio::select! {
            () = self.shutdown.cancelled() => Err(self.overloaded()),
            acquired = tokio::time::timeout(wait, self.pending.clone().acquire_many_owned(count)) => {
                match acquired {
                    Ok(Ok(permits)) => Ok(Admission { permits }),
                    _ => Err(self.overloaded()),
                }
            }
        }
    }

    /// Accepts deliveries if there is room for all of them now: see [`Engine::submit_admitted`].
    pub fn submit(&self, deliveries: Vec<Delivery>) -> Result<SubmitSummary, SubmitError> {
        if deliveries.is_empty() {
            return Ok(SubmitSummary::default());
        }
        let admission = self.try_admit(deliveries.len())?;
        self.submit_admitted(admission, deliveries)
    }

    /// Accepts deliveries that were given room by [`Engine::admit`] (one permit each; spare
    /// ones are returned): stores them (durably with a disk store) and queues them. An error
    /// means nothing was accepted. A webhook whose own queue is full drops its delivery
    /// (recorded as a dead letter).
    pub fn submit_admitted(
        &self,
        admission: Admission,
        deliveries: Vec<Delivery>,
    ) -> Result<SubmitSummary, SubmitError> {
        let mut summary = SubmitSummary::default();
        let mut permits = admission.permits;
        if deliveries.is_empty() {
            return Ok(summary);
        }
        if self.shutdown.is_cancelled() {
            return Err(self.overloaded().into());
        }
        let workers = self.workers();
        let mut accepted = Vec::with_capacity(deliveries.len());
        let mut refused = Vec::new();
        for delivery in deliveries.into_iter().map(Arc::new) {
            let slot = workers.get(&delivery.webhook).map(|w| {
                w.queue
                    .try_reserve()
                    .map(|slot| (slot, w))
                    .ok_or("the webhook's queue is full")
            });
            match slot {
                Some(Ok((slot, worker))) => accepted.push((delivery, slot, worker)),
                Some(Err(why)) => refused.push((delivery, why)),
                None => refused.push((delivery, "the webhook is not ready to deliver")),
            }
        }
        self.shared
            .store
            .add_pending(accepted.iter().map(|(d, ..)| d))?;
        for (delivery, slot, worker) in accepted {
            // Admitted without a permit of its own: refused like a full queue, never unbounded.
            let Some(permit) = permits.split(1) else {
                refused.push((delivery, "the webhook's queue is full"));
                continue;
            };
            let depth = &worker.metrics(&self.shared).queue_depth;
            depth.inc();
            match slot.send(Job {
                delivery,
                _permit: permit,
            }) {
                Ok(queued) => {
                    summary.queued += 1;
                    if queued == Queued::StartConsumer {
                        self.start(worker);
                    }
                }
                Err(job) => {
                    // The worker stopped between the reservation and now.
                    depth.dec();
                    refused.push((
                        job.delivery,
                        "the webhook was removed or can no longer deliver",
                    ));
                }
            }
        }
        drop(workers);
        for (delivery, why) in refused {
            self.shared.dropped(&delivery, why);
            summary.dropped += 1;
        }
        Ok(summary)
    }

    /// Queues again what the store holds as pending (after a restart). Call once the webhooks
    /// are loaded: deliveries for webhooks that no longer exist are dropped and recorded.
    pub fn resume(&self) -> Result<usize, StoreError> {
        let pending = self.shared.store.pending()?;
        let total = pending.len();
        let workers = self.workers();
        let mut by_webhook: HashMap<ObjectKey, Vec<Arc<Delivery>>> = HashMap::default();
        for delivery in pending {
            by_webhook
                .entry(delivery.webhook.clone())
                .or_default()
                .push(delivery);
        }
        for (key, deliveries) in by_webhook {
            let Some(worker) = workers.get(&key) else {
                for delivery in deliveries {
                    self.shared
                        .dropped(&delivery, "the webhook no longer exists or cannot deliver");
                }
                continue;
            };
            let worker = worker.clone();
            let semaphore = self.pending.clone();
            let engine = self.clone();
            self.tasks.spawn(async move {
                for delivery in deliveries {
                    let Ok(permit) = semaphore.clone().acquire_owned().await else {
                        return;
                    };
                    let depth = &worker.metrics(&engine.shared).queue_depth;
                    depth.inc();
                    match worker
                        .queue
                        .push(Job {
                            delivery,
                            _permit: permit,
                        })
                        .await
                    {
                        Ok(Queued::StartConsumer) => engine.start(&worker),
                        Ok(Queued::Running) => {}
                        Err(_) => {
                            depth.dec();
                            return;
                        }
                    }
                }
            });
        }
        if total > 0 {
            tracing::info!(deliveries = total, "resuming pending deliveries");
        }
        Ok(total)
    }

    /// Sends a recorded delivery again: a new attempt with the same Idempotency-Key.
    pub fn replay(&self, id: &str) -> Result<(), ReplayError> {
        let record = self
            .shared
            .store
            .record(id)
            .map_err(SubmitError::from)?
            .ok_or_else(|| ReplayError::NotFound(id.to_string()))?;
        let delivery = record
            .delivery
            .clone()
            .ok_or_else(|| ReplayError::NoContent(id.to_string()))?;
        if !self.contains(&delivery.webhook) {
            return Err(ReplayError::NotReady(delivery.webhook.clone()));
        }
        self.shared.store.unindex(&record);
        let summary = self.submit(vec![Delivery::clone(&delivery)])?;
        if summary.queued == 0 {
            return Err(ReplayError::NotReady(delivery.webhook.clone()));
        }
        Ok(())
    }

    /// Sends one test message to a webhook right away (one attempt, no queue) and reports it.
    /// `None` when the webhook has no worker (unknown, disabled or not ready).
    pub async fn send_test(&self, key: &ObjectKey) -> Option<DeliveryReport> {
        let target = self.target(key)?;
        let delivery = Arc::new(Delivery::test(key.clone()));
        // A test message counts toward its destination's pace (it is not held back for it).
        if let Some(pacer) = target.pacer() {
            let _ = pacer.try_take(tokio::time::Instant::now());
        }
        let result = send(&target, &delivery).await;
        let report = finish(&delivery, 1, &result);
        self.shared.report(report.clone(), &delivery, None);
        Some(report)
    }

    /// Stops every worker: no new attempts start; waits up to `deadline` for attempts in flight.
    pub async fn shutdown(&self, deadline: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("delivery workers did not stop within {deadline:?}");
        }
    }
}

fn finish(delivery: &Delivery, attempts: u32, last: &AttemptResult) -> DeliveryReport {
    let outcome = if last.class == AttemptClass::Success {
        ReportOutcome::Succeeded
    } else {
        ReportOutcome::Failed
    };
    let message = match (&last.error, last.status) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => String::new(),
    };
    DeliveryReport {
        webhook: delivery.webhook.clone(),
        delivery_id: delivery.id,
        test: delivery.test,
        alerts: delivery.alerts.len(),
        attempts,
        outcome,
        http_status: last.status,
        message,
        latency: last.latency,
        finished_at: Timestamp::now(),
    }
}

/// Drains a webhook's queue, one delivery at a time, and stops when it is empty (the next
/// delivery queued starts a new task) or when the webhook goes away or Herald stops.
async fn run_worker(shared: Arc<Shared>, worker: Arc<WorkerState>) {
    let handles = worker.metrics(&shared);
    let mut breaker = Breaker {
        failures: worker.failures.load(Ordering::Relaxed),
    };
    // Deliveries taken from the queue while a paced or batching webhook waits to send.
    let mut gathering = Gathering::default();
    while !worker.cancel.is_cancelled() {
        if gathering.is_empty() {
            let Some(job) = worker.queue.next_or_stop() else {
                return;
            };
            handles.queue_depth.dec();
            let target = worker.target();
            if !target.gathers() {
                // Not boxed: this task lives only while its queue holds work, so the space of
                // the send future inside it is never kept for an idle webhook.
                deliver(&shared, handles, &worker, &job.delivery, &[], &mut breaker).await;
                worker.failures.store(breaker.failures, Ordering::Relaxed);
                continue;
            }
            let alerts = job.delivery.alerts.len();
            gathering.push(job, alerts);
        }
        let target = worker.target();
        let pull = || {
            let job = worker.queue.try_pop()?;
            handles.queue_depth.dec();
            let alerts = job.delivery.alerts.len();
            Some((job, alerts))
        };
        if !gathering
            .wait(target.pacer(), target.batching(), pull, &worker.cancel)
            .await
        {
            break;
        }
        let cap = target
            .batching()
            .map_or(pace::DIGEST_MAX_ALERTS, |b| b.max_alerts);
        let jobs = gathering.next_message(cap);
        let parts: Vec<Arc<Delivery>> = jobs.iter().map(|j| j.delivery.clone()).collect();
        match (parts.as_slice(), Delivery::merged(&parts)) {
            ([one], _) => deliver(&shared, handles, &worker, one, &[], &mut breaker).await,
            (_, Some(merged)) => {
                let merged = Arc::new(merged);
                deliver(&shared, handles, &worker, &merged, &parts, &mut breaker).await;
            }
            _ => {}
        }
        worker.failures.store(breaker.failures, Ordering::Relaxed);
        // The permits go back once the message is done.
        drop(jobs);
    }
    // Cancelled: nothing more is queued, and what is left goes.
    for job in gathering.drain() {
        leave_or_drop(&shared, &job.delivery);
    }
    let _ = worker.queue.close();
    give_up_queued(
        &shared,
        &worker,
        std::iter::from_fn(|| worker.queue.try_pop()),
    );
}

/// Lets go of a cancelled webhook's queued deliveries: when Herald is stopping they stay pending
/// in the store for the next start; when the webhook went away they are dropped and recorded.
fn give_up_queued(shared: &Shared, worker: &WorkerState, jobs: impl IntoIterator<Item = Job>) {
    let mut left = 0usize;
    for job in jobs {
        worker.metrics(shared).queue_depth.dec();
        left += usize::from(shared.stopping.is_cancelled());
        leave_or_drop(shared, &job.delivery);
    }
    if left > 0 {
        if shared.store.is_durable() {
            tracing::info!(webhook = %worker.key, deliveries = left, "stopping; queued deliveries stay in the store for the next start");
        } else {
            tracing::warn!(webhook = %worker.key, deliveries = left, "stopping without --data-dir: queued deliveries are lost");
        }
    }
}

/// A delivery interrupted by cancellation: kept pending when Herald is stopping (resumed at the
/// next start), dropped and recorded when its webhook went away.
fn leave_or_drop(shared: &Shared, delivery: &Arc<Delivery>) {
    if !shared.stopping.is_cancelled() {
        shared.dropped(delivery, "the webhook was removed or can no longer deliver");
    }
}

/// Stops hammering an endpoint that keeps failing: after `THRESHOLD` failed attempts in a row,
/// the first attempt of each further delivery waits a growing cool-down (a probe); any success
/// closes it again.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
}

impl Breaker {
    const THRESHOLD: u32 = 5;

    fn is_open(&self) -> bool {
        self.failures >= Self::THRESHOLD
    }

    /// How long the next delivery's first attempt waits.
    fn cool_down(&self, policy: &RetryPolicy) -> Option<Duration> {
        if !self.is_open() {
            return None;
        }
        let exponent = (self.failures - Self::THRESHOLD).min(20);
        Some(
            policy
                .initial_backoff
                .saturating_mul(1u32 << exponent)
                .min(policy.max_backoff),
        )
    }

    fn record(&mut self, class: AttemptClass) {
        match class {
            AttemptClass::Retryable => self.failures = self.failures.saturating_add(1),
            // A final answer (2xx or 4xx) means the endpoint is up.
            AttemptClass::Success | AttemptClass::Final => self.failures = 0,
        }
    }
}

/// Exports `herald_circuit_open` for a webhook while its breaker is open, and nothing otherwise.
fn export_breaker(shared: &Shared, key: &ObjectKey, was_open: bool, breaker: &Breaker) {
    let circuit_open = &shared.metrics.circuit_open;
    match (was_open, breaker.is_open()) {
        (false, true) => {
            circuit_open.get_or_create(&WebhookLabels::from(key)).set(1);
        }
        (true, false) => {
            circuit_open.remove(&WebhookLabels::from(key));
        }
        _ => {}
    }
}

/// Reports the end of a delivery: for a merged one, the end of each delivery it carried.
fn report_all(
    shared: &Shared,
    report: DeliveryReport,
    delivery: &Arc<Delivery>,
    parts: &[Arc<Delivery>],
    handles: Option<&WebhookMetrics>,
) {
    if parts.is_empty() {
        shared.report(report, delivery, handles);
        return;
    }
    let merged = format!(
        "sent in merged message {} with {} alerts of {} deliveries",
        delivery.id,
        delivery.alerts.len(),
        parts.len()
    );
    for part in parts {
        let mut own = report.clone();
        own.delivery_id = part.id;
        own.test = part.test;
        own.alerts = part.alerts.len();
        own.message = if own.message.is_empty() {
            merged.clone()
        } else {
            format!("{}; {merged}", own.message)
        };
        shared.report(own, part, handles);
    }
}

/// A delivery given up because its webhook went away or Herald stops (each part of a merged
/// one).
fn leave_or_drop_all(shared: &Shared, delivery: &Arc<Delivery>, parts: &[Arc<Delivery>]) {
    if parts.is_empty() {
        leave_or_drop(shared, delivery);
    }
    for part in parts {
        leave_or_drop(shared, part);
    }
}

async fn deliver(
    shared: &Shared,
    handles: &WebhookMetrics,
    worker: &WorkerState,
    delivery: &Arc<Delivery>,
    parts: &[Arc<Delivery>],
    breaker: &mut Breaker,
) {
    let cancel = &worker.cancel;
    let policy = shared.config.retry;
    if let Some(wait) = breaker.cool_down(&policy) {
        tracing::debug!(webhook = %delivery.webhook, ?wait, "circuit open: waiting before probing the endpoint");
        tokio::select! {
            () = cancel.cancelled() => {
                leave_or_drop_all(shared, delivery, parts);
                return;
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
    let started = tokio::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let current = worker.target();
        // A retry is a message too: it waits its turn at a paced destination (and out a block
        // the destination asked for).
        if attempt > 1
            && let Some(pacer) = current.pacer()
            && !pace::take_turn(pacer, cancel).await
        {
            leave_or_drop_all(shared, delivery, parts);
            return;
        }
        let result = send(&current, delivery).await;
        handles.duration.observe(result.latency.as_secs_f64());
        let was_open = breaker.is_open();
        breaker.record(result.class);
        export_breaker(shared, &delivery.webhook, was_open, breaker);
        if result.class != AttemptClass::Retryable {
            report_all(
                shared,
                finish(delivery, attempt, &result),
                delivery,
                parts,
                Some(handles),
            );
            return;
        }
        let delay = policy.delay(attempt, result.retry_after);
        if let Some(asked) = result.retry_after
            && let Some(pacer) = current.pacer()
        {
            // The destination asked for a pause (a robot's block time can be longer than the
            // longest backoff): every webhook sending to it, this retry included, waits it out
            // in full, up to the time a delivery is retried at all.
            pacer.block_for(asked.min(policy.max_elapsed));
        }
        let exhausted =
            attempt >= policy.max_attempts || started.elapsed() + delay > policy.max_elapsed;
        if exhausted {
            let mut report = finish(delivery, attempt, &result);
            report.message = format!("gave up after {attempt} attempts: {}", report.message);
            report_all(shared, report, delivery, parts, Some(handles));
            return;
        }
        shared.metrics.delivery(&delivery.webhook, "retried");
        tracing::debug!(
            webhook = %delivery.webhook, delivery = %delivery.id, attempt,
            error = ?result.error, ?delay, "attempt failed; retrying"
        );
        tokio::select! {
            () = cancel.cancelled() => {
                leave_or_drop_all(shared, delivery, parts);
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        for _ in 0..100 {
            let d1 = policy.delay(1, None);
            assert!(
                d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1),
                "{d1:?}"
            );
            let d3 = policy.delay(3, None);
            assert!(
                d3 >= Duration::from_secs(2) && d3 <= Duration::from_secs(4),
                "{d3:?}"
            );
            let d10 = policy.delay(10, None);
            assert!(
                d10 >= Duration::from_secs(5) && d10 <= Duration::from_secs(10),
                "{d10:?}"
            );
        }
        assert_eq!(
            policy.delay(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            policy.delay(1, Some(Duration::from_secs(3000))),
            Duration::from_secs(10)
        );
    }
}
