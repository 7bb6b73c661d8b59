//! The delivery engine: per-webhook workers with their backlogs, retries and reports.
//!
//! A delivery accepted (answered 200) ends only as succeeded, failed (a final answer, its
//! retries ran out, or its webhook's backlog was at its limit: a dead letter with its content,
//! replayable), or dropped because its webhook went away. Nothing is dropped for lack of room:
//! when Herald cannot keep a batch it refuses all of it before accepting any.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use foldhash::HashMap;
use k8s_openapi::jiff::Timestamp;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pace::{self, Gathering};
use super::queue::{JobQueue, Next, Queued};
use super::send::{AttemptClass, AttemptResult, send};
use super::target::Target;
use crate::metrics::{Metrics, WebhookLabels, WebhookMetrics};
use crate::object::ObjectKey;
use crate::outgoing::DeliveryId;
use crate::outgoing::{Delivery, ReportOutcome, RoutedBatch};
use crate::store::{DeliveryRecord, HandOver, RetrySchedule, Store, StoreError};

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
    /// Deliveries accepted and not finished per webhook (its backlog). Past it, further
    /// deliveries to that webhook become dead letters (kept with their content, replayable).
    /// With a memory store a webhook whose backlog holds half of `max_pending` also refuses
    /// (503) batches with deliveries for it, so one dead webhook cannot take the whole budget.
    pub backlog_limit: usize,
    /// Deliveries held in memory across all webhooks. With a memory store that is every
    /// accepted and unfinished delivery: past it, the receiver answers 503. With a disk store
    /// it is what is loaded to feed the workers (the rest waits on disk), and it also bounds
    /// the deliveries waiting to be written: past that, the receiver answers 503.
    pub max_pending: usize,
    /// Retries.
    pub retry: RetryPolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            backlog_limit: 100_000,
            max_pending: 20_000,
            retry: RetryPolicy::default(),
        }
    }
}

impl EngineConfig {
    /// The backlog a webhook may hold with this store: past it, its deliveries become dead
    /// letters (a disk store, or past `backlog_limit`) or its batches are refused (a memory
    /// store's share of the budget).
    fn webhook_share(&self, durable: bool) -> usize {
        if durable {
            self.backlog_limit.max(1)
        } else {
            self.backlog_limit.min(self.max_pending / 2).max(1)
        }
    }
}

/// Most deliveries a worker loads from a disk store at once.
const LOAD_BATCH: usize = 256;

/// How long a request's deliveries wait for room in the memory budget before they are left
/// to the disk store alone (and read back by their workers later). Room that is short only
/// for a moment (deliveries finishing) is worth waiting for: a delivery read back costs more
/// than one handed over.
const HAND_OVER_WAIT: Duration = Duration::from_millis(20);

/// A webhook's backlog at this share of its limit is reported as nearly full.
const NEAR_LIMIT_PERCENT: usize = 80;

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

    /// Called when a webhook's backlog comes near its limit (see [`BacklogState`]) and when it
    /// falls back to half of it, so that its status can say so before deliveries overflow.
    fn backlog(&self, _webhook: &ObjectKey, _state: BacklogState) {}
}

/// A webhook's backlog as it crossed a threshold: past [`BacklogState::limit`], its new
/// deliveries become dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BacklogState {
    /// Deliveries accepted and not finished.
    pub backlog: usize,
    /// The webhook's backlog limit (`--backlog-limit`, or its share of `--max-pending` in
    /// memory).
    pub limit: usize,
    /// At 80% of the limit or more (and not yet back to half of it).
    pub near_limit: bool,
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
    /// Deliveries accepted into their webhook's backlog.
    pub queued: usize,
    /// Deliveries whose webhook's backlog was at its limit: kept as dead letters.
    pub dead_letters: usize,
}

/// Room for a number of deliveries under the global limit (see [`EngineConfig::max_pending`]),
/// given back when dropped unless they were submitted.
#[derive(Debug)]
struct Admission {
    permits: OwnedSemaphorePermit,
}

struct Job {
    delivery: Arc<Delivery>,
    /// Its row in a disk store's backlog.
    seq: Option<u64>,
    /// Its place in the memory budget.
    _permit: Option<OwnedSemaphorePermit>,
}

/// One webhook's delivery state. Its task (see [`run_worker`]) runs only while the queue holds
/// something: an idle webhook costs this struct and its queue, not a task.
struct WorkerState {
    key: ObjectKey,
    /// The current settings, read at the start of every attempt (queued deliveries use new
    /// settings from their next attempt on: Secret rotation needs no restart).
    target: RwLock<Arc<Target>>,
    queue: JobQueue<Job>,
    /// Deliveries accepted and not finished, in memory or in the store.
    backlog: AtomicUsize,
    /// The backlog was reported as nearly full (and has not fallen back since).
    near_limit: AtomicBool,
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

    fn metrics(&self, shared: &EngineContext) -> &WebhookMetrics {
        self.metrics
            .get_or_init(|| shared.metrics.webhook(&WebhookLabels::from(&self.key)))
    }

    /// Takes a place in the backlog, or says why not: at the backlog limit (a dead letter), or
    /// at a memory store's share of the budget (the batch is refused).
    fn take_place(&self, shared: &EngineContext) -> Result<(), Placed> {
        let limit = shared.config.backlog_limit.max(1);
        let share = shared.config.webhook_share(shared.store.is_durable());
        let taken = self
            .backlog
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < share).then_some(n + 1)
            });
        match taken {
            Ok(_) => {
                self.metrics(shared).queue_depth.inc();
                self.watch_limit(shared, share);
                Ok(())
            }
            Err(n) if n >= limit => Err(Placed::Overflow),
            Err(_) => Err(Placed::Full),
        }
    }

    /// Adds deliveries found in the store at start.
    fn add_found(&self, shared: &EngineContext, count: usize) {
        self.backlog.fetch_add(count, Ordering::AcqRel);
        self.metrics(shared)
            .queue_depth
            .inc_by(i64::try_from(count).unwrap_or(i64::MAX));
        self.watch_limit(
            shared,
            shared.config.webhook_share(shared.store.is_durable()),
        );
    }

    /// Sets the backlog to what a shared store holds for the webhook (all replicas together).
    fn refresh(&self, shared: &EngineContext, backlog: usize) {
        self.backlog.store(backlog, Ordering::Release);
        self.metrics(shared)
            .queue_depth
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        self.watch_limit(shared, shared.config.webhook_share(true));
    }

    /// Gives a place back: a delivery finished.
    fn release_place(&self, shared: &EngineContext) {
        // Saturating: with a shared store the count is refreshed from the store, and a
        // delivery accepted here may have been counted by another replica's refresh.
        let left = self
            .backlog
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or_default()
            .saturating_sub(1);
        self.metrics(shared).queue_depth.dec();
        let limit = shared.config.webhook_share(shared.store.is_durable());
        if left <= limit / 2 && self.near_limit.swap(false, Ordering::AcqRel) {
            tracing::info!(webhook = %self.key, backlog = left, limit, "the webhook's backlog is no longer near its limit");
            shared.backlog_crossed(&self.key, left, limit, false);
        }
    }

    /// Warns once as the backlog nears its limit.
    fn watch_limit(&self, shared: &EngineContext, limit: usize) {
        let backlog = self.backlog.load(Ordering::Acquire);
        if backlog.saturating_mul(100) >= limit.saturating_mul(NEAR_LIMIT_PERCENT)
            && !self.near_limit.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(webhook = %self.key, backlog, limit, "the webhook's backlog is near its limit; past it, new deliveries to it become dead letters");
            shared.backlog_crossed(&self.key, backlog, limit, true);
        }
    }
}

/// What the engine and every worker share: configuration, metrics, the store, the memory
/// budget and the report observers.
struct EngineContext {
    config: EngineConfig,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    /// The memory budget: permits held by deliveries in memory (see
    /// [`EngineConfig::max_pending`]).
    budget: Arc<Semaphore>,
    /// Herald is stopping: unfinished deliveries stay pending in the store for the next start.
    stopping: CancellationToken,
    observers: RwLock<Vec<Arc<dyn DeliveryObserver>>>,
    /// Some observer was added: until then no report takes the observers' lock, which every
    /// worker would otherwise take for every delivery.
    observed: AtomicBool,
}

impl EngineContext {
    /// Tells the observers that a webhook's backlog came near its limit or fell back.
    fn backlog_crossed(&self, webhook: &ObjectKey, backlog: usize, limit: usize, near_limit: bool) {
        let state = BacklogState {
            backlog,
            limit,
            near_limit,
        };
        if let Ok(observers) = self.observers.read() {
            for observer in observers.iter() {
                observer.backlog(webhook, state);
            }
        }
    }

    fn report(
        &self,
        report: DeliveryReport,
        delivery: &Arc<Delivery>,
        seq: Option<u64>,
        metrics: Option<&WebhookMetrics>,
    ) {
        match (report.outcome, metrics) {
            (ReportOutcome::Succeeded, Some(metrics)) => {
                metrics.succeeded.inc();
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
        if let Err(e) = self.store.finish(seq, record) {
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
        if self.observed.load(Ordering::Acquire)
            && let Ok(observers) = self.observers.read()
        {
            for observer in observers.iter() {
                observer.report(&report);
            }
        }
    }

    /// Ends a delivery that was never sent: `Dropped` (its webhook went away) or `Failed` (a
    /// dead letter: its webhook's backlog was full).
    fn unsent(
        &self,
        delivery: &Arc<Delivery>,
        seq: Option<u64>,
        outcome: ReportOutcome,
        why: &str,
    ) {
        self.report(
            DeliveryReport {
                webhook: delivery.webhook.clone(),
                delivery_id: delivery.id,
                test: delivery.test,
                alerts: delivery.alerts.len(),
                attempts: 0,
                outcome,
                http_status: None,
                message: why.to_string(),
                latency: Duration::ZERO,
                finished_at: Timestamp::now(),
            },
            delivery,
            seq,
            None,
        );
    }

    fn dropped(&self, delivery: &Arc<Delivery>, seq: Option<u64>, why: &str) {
        self.unsent(delivery, seq, ReportOutcome::Dropped, why);
    }
}

/// What became of a delivery's place in its webhook's backlog.
enum Placed {
    /// It holds a place.
    Kept(Arc<WorkerState>),
    /// Its webhook's backlog is full: it becomes a dead letter.
    Overflow,
    /// Its webhook has no worker.
    Gone,
    /// Its webhook holds its share of a memory store's budget: the batch is refused.
    Full,
}

/// The delivery engine. Cheap to clone; every clone drives the same workers.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<EngineContext>,
    workers: Arc<Mutex<HashMap<ObjectKey, Arc<WorkerState>>>>,
    /// With a disk store: room for deliveries waiting to be written (see
    /// [`EngineConfig::max_pending`]). With a memory store admission takes the budget itself.
    writes: Arc<Semaphore>,
    /// Refuses new deliveries: Herald is stopping.
    closing: CancellationToken,
    /// Stops the workers: what they hold stays in the store.
    shutdown: CancellationToken,
    /// The store's backlog was counted at start (see [`Engine::resume`]).
    resumed: Arc<AtomicBool>,
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
            writes: Arc::new(Semaphore::new(config.max_pending)),
            shared: Arc::new(EngineContext {
                config,
                metrics,
                store,
                budget: Arc::new(Semaphore::new(config.max_pending)),
                stopping: shutdown.clone(),
                observers: RwLock::new(Vec::new()),
                observed: AtomicBool::new(false),
            }),
            workers: Arc::default(),
            closing: CancellationToken::new(),
            shutdown,
            resumed: Arc::default(),
            tasks: TaskTracker::new(),
        }
    }

    /// Adds an observer of delivery reports.
    pub fn observe(&self, observer: Arc<dyn DeliveryObserver>) {
        if let Ok(mut observers) = self.shared.observers.write() {
            observers.push(observer);
            self.shared.observed.store(true, Ordering::Release);
        }
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Arc<WorkerState>>> {
        // A worker map poisoned by a panic elsewhere is still consistent: each entry is replaced whole.
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn durable(&self) -> bool {
        self.shared.store.is_durable()
    }

    /// Installs or replaces a webhook's settings. Queued deliveries keep their place and use the
    /// new settings from their next attempt on (Secret rotation needs no restart). A webhook
    /// that comes back (after it could not deliver for a while) resumes what a disk store
    /// still holds for it.
    pub fn upsert(&self, target: Target) {
        let key = target.key.clone();
        let target = Arc::new(target);
        let mut workers = self.workers();
        if let Some(worker) = workers.get(&key) {
            worker.set_target(target);
            return;
        }
        let state = Arc::new(WorkerState {
            key: key.clone(),
            target: RwLock::new(target),
            queue: JobQueue::new(),
            backlog: AtomicUsize::new(0),
            near_limit: AtomicBool::new(false),
            cancel: self.shutdown.child_token(),
            metrics: OnceLock::new(),
            failures: AtomicU32::new(0),
        });
        workers.insert(key, state.clone());
        drop(workers);
        if self.durable() && self.resumed.load(Ordering::Acquire) {
            match self.shared.store.load(&state.key, 0, usize::MAX) {
                Ok(found) if !found.is_empty() => {
                    tracing::info!(webhook = %state.key, deliveries = found.len(), "resuming the webhook's stored backlog");
                    state.add_found(&self.shared, found.len());
                    self.wake(&state);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(webhook = %state.key, "cannot read the webhook's stored backlog: {e}")
                }
            }
        }
    }

    /// Starts the task that drains a webhook's queue (called by whoever queued into an idle one).
    fn start(&self, worker: &Arc<WorkerState>) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => self.start_on(worker, &handle),
            Err(_) => tracing::error!(webhook = %worker.key, "no async runtime to deliver in"),
        }
    }

    /// [`Engine::start`] on a given runtime (from a store's writer thread).
    fn start_on(&self, worker: &Arc<WorkerState>, runtime: &tokio::runtime::Handle) {
        let task = run_worker(self.shared.clone(), worker.clone());
        self.tasks.spawn_on(task, runtime);
    }

    /// Tells a webhook's worker that the store holds more for it, starting it if idle.
    fn wake(&self, worker: &Arc<WorkerState>) {
        if worker.queue.stored() == Some(Queued::StartConsumer) {
            self.start(worker);
        }
    }

    /// Stops delivering to a webhook (deleted, disabled or no longer ready). With a memory store
    /// what it had queued is dropped and recorded as such; a disk store keeps its backlog, resumed
    /// if the webhook comes back and dropped and recorded at the next start if it does not.
    pub fn remove(&self, key: &ObjectKey) {
        let Some(worker) = self.workers().remove(key) else {
            return;
        };
        worker.cancel.cancel();
        // A running task lets go of what is queued itself; otherwise the queue is empty, but
        // make sure.
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

    /// A webhook's backlog (deliveries accepted and not finished) and its limit.
    pub fn backlog(&self, key: &ObjectKey) -> Option<(usize, usize)> {
        let limit = self.shared.config.webhook_share(self.durable());
        self.workers()
            .get(key)
            .map(|w| (w.backlog.load(Ordering::Acquire), limit))
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

    /// What admission takes room from: the memory budget itself with a memory store, the
    /// deliveries waiting to be written with a disk store.
    fn admission_room(&self) -> &Arc<Semaphore> {
        if self.durable() {
            &self.writes
        } else {
            &self.shared.budget
        }
    }

    /// Room for `count` deliveries under the global limit, taken now or not at all.
    fn try_admit(&self, count: usize) -> Result<Admission, Overloaded> {
        if self.closing.is_cancelled() {
            return Err(self.overloaded());
        }
        let count = u32::try_from(count).map_err(|_| self.overloaded())?;
        let permits = self
            .admission_room()
            .clone()
            .try_acquire_many_owned(count)
            .map_err(|_| self.overloaded())?;
        Ok(Admission { permits })
    }

    /// Room for `count` deliveries under the global limit, waiting up to `wait` for deliveries
    /// in flight to finish. Waiting once costs less than a refusal that the sender answers by
    /// sending the whole batch again. More than the limit itself, or Herald stopping, fails at
    /// once.
    async fn admit(&self, count: usize, wait: Duration) -> Result<Admission, Overloaded> {
        match self.try_admit(count) {
            Ok(admission) => return Ok(admission),
            Err(overloaded) if wait.is_zero() || count > self.shared.config.max_pending => {
                return Err(overloaded);
            }
            Err(_) => {}
        }
        let count = u32::try_from(count).map_err(|_| self.overloaded())?;
        tokio::select! {
            () = self.closing.cancelled() => Err(self.overloaded()),
            acquired = tokio::time::timeout(wait, self.admission_room().clone().acquire_many_owned(count)) => {
                match acquired {
                    Ok(Ok(permits)) => Ok(Admission { permits }),
                    _ => Err(self.overloaded()),
                }
            }
        }
    }

    /// Accepts a routed batch's deliveries if there is room for all of them now. With a memory
    /// store they are queued at once; with a disk store they are written in the background
    /// (callers that answer for them use [`Engine::accept_batch`]). An error means nothing was
    /// accepted.
    pub fn submit_batch(&self, routed: RoutedBatch) -> Result<SubmitSummary, SubmitError> {
        let admission = self.try_admit(routed.deliveries())?;
        self.submit_admitted(admission, routed.into_deliveries())
    }

    /// Accepts a routed batch's deliveries, returning once they are kept (durably with a disk
    /// store). When Herald holds as many deliveries as it may, waits up to `wait` for room
    /// for deliveries in flight to finish before refusing. An error means nothing was accepted.
    pub async fn accept_batch(
        &self,
        routed: RoutedBatch,
        wait: Duration,
    ) -> Result<SubmitSummary, SubmitError> {
        let admission = self.admit(routed.deliveries(), wait).await?;
        self.accept(admission, routed.into_deliveries()).await
    }

    /// Accepts deliveries if there is room for all of them now, as [`Engine::submit_batch`] does.
    pub fn submit(&self, deliveries: Vec<Delivery>) -> Result<SubmitSummary, SubmitError> {
        if deliveries.is_empty() {
            return Ok(SubmitSummary::default());
        }
        let admission = self.try_admit(deliveries.len())?;
        self.submit_admitted(admission, deliveries)
    }

    /// Gives each delivery its place in its webhook's backlog, or says why it has none.
    /// When a webhook holds its share of a memory store's budget, the whole batch is refused:
    /// no place is kept.
    fn place(&self, deliveries: &[Arc<Delivery>]) -> Result<Vec<Placed>, Overloaded> {
        let workers = self.workers();
        let placed: Vec<Placed> = deliveries
            .iter()
            .map(|delivery| match workers.get(&delivery.webhook) {
                Some(worker) => match worker.take_place(&self.shared) {
                    Ok(()) => Placed::Kept(worker.clone()),
                    Err(why) => why,
                },
                None => Placed::Gone,
            })
            .collect();
        drop(workers);
        if placed.iter().any(|p| matches!(p, Placed::Full)) {
            self.release(&placed);
            return Err(self.overloaded());
        }
        Ok(placed)
    }

    /// Gives back the places taken.
    fn release(&self, placed: &[Placed]) {
        for placed in placed {
            if let Placed::Kept(worker) = placed {
                worker.release_place(&self.shared);
            }
        }
    }

    /// Ends deliveries whose webhook's backlog was full (dead letters) or whose webhook went
    /// away; returns how many became dead letters.
    fn end_unplaced(
        &self,
        deliveries: &[Arc<Delivery>],
        placed: &[Placed],
        seqs: &[Option<u64>],
    ) -> usize {
        let limit = self.shared.config.backlog_limit;
        let mut dead_letters = 0;
        for ((delivery, placed), seq) in deliveries.iter().zip(placed).zip(seqs) {
            match placed {
                Placed::Kept(_) | Placed::Full => {}
                Placed::Overflow => {
                    dead_letters += 1;
                    self.shared
                        .metrics
                        .delivery(&delivery.webhook, "overflowed");
                    let why = format!(
                        "the webhook's backlog holds {limit} deliveries, its limit: kept as a dead letter (replay it once the webhook catches up)"
                    );
                    self.shared
                        .unsent(delivery, *seq, ReportOutcome::Failed, &why);
                }
                Placed::Gone => self.shared.dropped(
                    delivery,
                    *seq,
                    "the webhook was removed or can no longer deliver",
                ),
            }
        }
        dead_letters
    }

    /// Accepts deliveries that were given room by [`Engine::admit`]. With a memory store they
    /// are queued at once; with a disk store they are written in the background (callers that
    /// answer for them use [`Engine::accept`], which waits for the write). An error means
    /// nothing was accepted.
    fn submit_admitted(
        &self,
        admission: Admission,
        deliveries: Vec<Delivery>,
    ) -> Result<SubmitSummary, SubmitError> {
        if self.closing.is_cancelled() {
            return Err(self.overloaded().into());
        }
        if !self.durable() {
            return self.queue_in_memory(admission, deliveries);
        }
        let count = deliveries.len();
        let engine = self.clone();
        let task = async move {
            if let Err(e) = engine.accept(admission, deliveries).await {
                tracing::error!("cannot store deliveries: {e}");
            }
        };
        tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Database("no async runtime to write in".into()))?
            .spawn(task);
        Ok(SubmitSummary {
            queued: count,
            dead_letters: 0,
        })
    }

    /// Accepts deliveries that were given room by [`Engine::admit`]: returns once they are
    /// kept (durably with a disk store, in one write shared with other requests waiting). An
    /// error means nothing was accepted. A delivery whose webhook's backlog is at its limit is
    /// kept as a dead letter.
    async fn accept(
        &self,
        admission: Admission,
        deliveries: Vec<Delivery>,
    ) -> Result<SubmitSummary, SubmitError> {
        if self.closing.is_cancelled() {
            return Err(self.overloaded().into());
        }
        if !self.durable() {
            return self.queue_in_memory(admission, deliveries);
        }
        if !self.shared.store.is_healthy() {
            return Err(StoreError::Database(
                "the delivery store's database does not answer".into(),
            )
            .into());
        }
        let deliveries: Vec<Arc<Delivery>> = deliveries.into_iter().map(Arc::new).collect();
        let placed = self.place(&deliveries)?;
        // Dead letters are written with the rest, so that they too survive a crash once
        // answered; deliveries for a webhook that went away are not.
        let stored: Vec<Arc<Delivery>> = deliveries
            .iter()
            .zip(&placed)
            .filter(|(_, p)| !matches!(p, Placed::Gone))
            .map(|(d, _)| d.clone())
            .collect();
        let room = self.room_to_hand_over(&placed).await;
        let hand_over = self.hand_over(&deliveries, &placed, room);
        let written = self
            .shared
            .store
            .append_handing_over(&stored, Some(hand_over))
            .await;
        drop(admission);
        let written = match written {
            Ok(seqs) => seqs,
            Err(e) => {
                self.release(&placed);
                return Err(e.into());
            }
        };
        let mut seqs = written.into_iter();
        let seqs: Vec<Option<u64>> = placed
            .iter()
            .map(|p| match p {
                Placed::Gone => None,
                _ => seqs.next(),
            })
            .collect();
        let queued = placed
            .iter()
            .filter(|p| matches!(p, Placed::Kept(_)))
            .count();
        Ok(SubmitSummary {
            queued,
            dead_letters: self.end_unplaced(&deliveries, &placed, &seqs),
        })
    }

    /// What the store's writer calls once the deliveries placed in their webhooks' backlogs are
    /// kept: each is handed to its worker's queue with its place in the memory budget, so that
    /// the worker does not read it back, when the queue holds everything stored before it and
    /// the budget has room; otherwise the worker is told to load it. In a shared store only
    /// deliveries written claimed by this replica are handed over (the others are claimed by
    /// whichever replica holds their webhook, woken by the store's notification).
    fn hand_over(
        &self,
        deliveries: &[Arc<Delivery>],
        placed: &[Placed],
        mut room: Option<OwnedSemaphorePermit>,
    ) -> HandOver {
        // The rows stored, in order: the placed ones, each with its worker (the others are
        // dead letters, finished right after the write).
        let rows: Vec<Option<(Arc<WorkerState>, Arc<Delivery>)>> = deliveries
            .iter()
            .zip(placed)
            .filter(|(_, p)| !matches!(p, Placed::Gone))
            .map(|(delivery, p)| match p {
                Placed::Kept(worker) => Some((worker.clone(), delivery.clone())),
                _ => None,
            })
            .collect();
        let engine = self.clone();
        let runtime = tokio::runtime::Handle::try_current().ok();
        Box::new(move |seqs: &[u64], held: &[bool]| {
            let shared = engine.store().is_shared();
            for ((row, seq), held) in rows.into_iter().zip(seqs).zip(held) {
                let Some((worker, delivery)) = row else {
                    continue;
                };
                let queued = match (*held, shared) {
                    (false, true) => continue,
                    (false, false) => worker.queue.stored(),
                    (true, _) => {
                        let permit = if shared || worker.queue.takes_hand_over() {
                            take_one(&mut room)
                                .or_else(|| engine.shared.budget.clone().try_acquire_owned().ok())
                        } else {
                            None
                        };
                        let job = |permit| Job {
                            delivery,
                            seq: Some(*seq),
                            _permit: permit,
                        };
                        match (permit, shared) {
                            // A claimed row is this replica's to deliver, room or not: no
                            // load would find it.
                            (permit, true) => match worker.queue.push(job(permit)) {
                                Ok(queued) => Some(queued),
                                Err(_) => {
                                    // The webhook went away here meanwhile: the row returns
                                    // to the queue once its lease runs out.
                                    engine.store().let_go(*seq);
                                    None
                                }
                            },
                            (Some(permit), false) => {
                                worker.queue.hand_over(*seq, job(Some(permit)))
                            }
                            (None, false) => worker.queue.stored(),
                        }
                    }
                };
                if queued == Some(Queued::StartConsumer) {
                    match &runtime {
                        Some(runtime) => engine.start_on(&worker, runtime),
                        None => engine.start(&worker),
                    }
                }
            }
        })
    }

    /// Room in the memory budget for the deliveries of a request that a disk store will hand
    /// over, taken now or within [`HAND_OVER_WAIT`]; `None` without room (they are left to the
    /// store) and with a shared store (whose hand-over does not wait for room).
    async fn room_to_hand_over(&self, placed: &[Placed]) -> Option<OwnedSemaphorePermit> {
        if self.store().is_shared() {
            return None;
        }
        let kept = placed
            .iter()
            .filter(|p| matches!(p, Placed::Kept(_)))
            .count();
        let kept = u32::try_from(kept).ok().filter(|kept| *kept > 0)?;
        let budget = self.shared.budget.clone();
        if let Ok(room) = budget.clone().try_acquire_many_owned(kept) {
            return Some(room);
        }
        tokio::time::timeout(HAND_OVER_WAIT, budget.acquire_many_owned(kept))
            .await
            .ok()?
            .ok()
    }

    /// Queues deliveries in their webhooks' queues (a memory store), each holding one permit
    /// of the admission.
    fn queue_in_memory(
        &self,
        admission: Admission,
        deliveries: Vec<Delivery>,
    ) -> Result<SubmitSummary, SubmitError> {
        let mut permits = Some(admission.permits);
        let deliveries: Vec<Arc<Delivery>> = deliveries.into_iter().map(Arc::new).collect();
        let mut placed = self.place(&deliveries)?;
        let mut summary = SubmitSummary::default();
        for (delivery, place) in deliveries.iter().zip(placed.iter_mut()) {
            let Placed::Kept(worker) = place else {
                continue;
            };
            let permit = take_one(&mut permits);
            let job = Job {
                delivery: delivery.clone(),
                seq: None,
                _permit: permit,
            };
            match worker.queue.push(job) {
                Ok(queued) => {
                    summary.queued += 1;
                    if queued == Queued::StartConsumer {
                        self.start(worker);
                    }
                }
                Err(_) => {
                    // The worker stopped between the lookup and now.
                    worker.release_place(&self.shared);
                    *place = Placed::Gone;
                }
            }
        }
        let seqs = vec![None; deliveries.len()];
        summary.dead_letters = self.end_unplaced(&deliveries, &placed, &seqs);
        Ok(summary)
    }

    /// Resumes what the store holds (after a restart). Call once the webhooks are loaded:
    /// deliveries for webhooks that no longer exist are dropped and recorded.
    pub fn resume(&self) -> Result<usize, StoreError> {
        if let Some((wakeup, every)) = self.shared.store.wakeups()
            && !self.resumed.load(Ordering::Acquire)
        {
            self.watch_shared_backlog(wakeup, every);
        }
        let backlog = self.shared.store.backlog()?;
        self.resumed.store(true, Ordering::Release);
        let mut total = 0;
        for (key, count) in backlog {
            total += count;
            let worker = self.workers().get(&key).cloned();
            match worker {
                Some(worker) => {
                    worker.add_found(&self.shared, count);
                    self.wake(&worker);
                }
                None => {
                    let mut after = 0;
                    loop {
                        let found = self.shared.store.load(&key, after, LOAD_BATCH)?;
                        let Some((last, _)) = found.last() else {
                            break;
                        };
                        after = *last;
                        for (seq, delivery) in &found {
                            self.shared.dropped(
                                delivery,
                                Some(*seq),
                                "the webhook no longer exists or cannot deliver",
                            );
                        }
                    }
                }
            }
        }
        if total > 0 {
            tracing::info!(deliveries = total, "resuming pending deliveries");
        }
        Ok(total)
    }

    /// With a shared store: wakes the workers of webhooks with claimable work whenever a
    /// replica stores deliveries (a notification) and every `every` (what notifications
    /// miss: leases that ran out, a lost connection), and refreshes each webhook's backlog
    /// count from the store (deliveries accepted by every replica).
    fn watch_shared_backlog(&self, wakeup: Arc<tokio::sync::Notify>, every: Duration) {
        let engine = self.clone();
        let sweep_every = engine.shared.store.orphan_sweep_every();
        let task = async move {
            // Notifications do not put the poll off: it also refreshes the counts.
            let mut poll = tokio::time::interval(every);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sweep =
                tokio::time::interval_at(tokio::time::Instant::now() + sweep_every, sweep_every);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let notified = tokio::select! {
                    () = engine.shutdown.cancelled() => return,
                    () = wakeup.notified() => engine.shared.store.take_notified(),
                    _ = poll.tick() => Vec::new(),
                    _ = sweep.tick() => {
                        engine.sweep_orphans().await;
                        continue;
                    }
                };
                if !notified.is_empty() {
                    // New rows of these webhooks: their idle workers try to claim them (a
                    // worker of a webhook another replica holds finds nothing). Counting the
                    // whole backlog is left to the poll.
                    let workers = engine.workers();
                    let woken: Vec<Arc<WorkerState>> = notified
                        .iter()
                        .filter_map(|key| workers.get(key).cloned())
                        .collect();
                    drop(workers);
                    for worker in woken {
                        engine.wake(&worker);
                    }
                    continue;
                }
                let waiting = match engine.shared.store.waiting().await {
                    Ok(waiting) => waiting,
                    Err(e) => {
                        tracing::warn!("cannot read the shared backlog: {e}");
                        continue;
                    }
                };
                let workers: Vec<Arc<WorkerState>> = engine.workers().values().cloned().collect();
                let counts: HashMap<&ObjectKey, (usize, usize)> = waiting
                    .iter()
                    .map(|(key, total, claimable)| (key, (*total, *claimable)))
                    .collect();
                for worker in workers {
                    let (total, claimable) = counts.get(&worker.key).copied().unwrap_or_default();
                    worker.refresh(&engine.shared, total);
                    if claimable > 0 {
                        engine.wake(&worker);
                    }
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(task);
            }
            Err(_) => tracing::error!("no async runtime to watch the shared backlog in"),
        }
    }

    /// With a shared store: drops and records the deliveries of webhooks no replica has
    /// (deleted everywhere; see [`Store::orphaned`]). A webhook this replica has is left alone
    /// (its worker claims its rows), and claiming takes the webhook's lease, so two replicas
    /// sweeping at once do not both drop the same deliveries.
    async fn sweep_orphans(&self) {
        let orphaned = match self.shared.store.orphaned().await {
            Ok(orphaned) => orphaned,
            Err(e) => {
                tracing::warn!("cannot look for deliveries of deleted webhooks: {e}");
                return;
            }
        };
        for key in orphaned {
            if self.contains(&key) {
                continue;
            }
            let mut dropped = 0usize;
            loop {
                let found = match self.shared.store.claim(&key, 0, LOAD_BATCH).await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::warn!(webhook = %key, "cannot drop the deliveries of a deleted webhook: {e}");
                        break;
                    }
                };
                if found.is_empty() {
                    break;
                }
                dropped += found.len();
                for (seq, delivery) in &found {
                    self.shared.dropped(
                        delivery,
                        Some(*seq),
                        "the webhook no longer exists on any replica",
                    );
                }
            }
            if dropped > 0 {
                tracing::info!(webhook = %key, deliveries = dropped, "dropped the stored deliveries of a webhook no replica has");
            }
        }
    }

    /// Sends a recorded delivery again: a new attempt with the same Idempotency-Key.
    pub async fn replay(&self, id: &str) -> Result<(), ReplayError> {
        let record = self
            .shared
            .store
            .record(id)
            .await
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
        let report = report_after(&delivery, 1, &result);
        self.shared.report(report.clone(), &delivery, None, None);
        Some(report)
    }

    /// Stops: refuses new deliveries at once, keeps delivering for most of `deadline` (the
    /// workers stop by themselves once every backlog is delivered), then stops the workers,
    /// leaving what they hold in the store for the next start, and makes the store durable.
    pub async fn shutdown(&self, deadline: Duration) {
        self.closing.cancel();
        self.tasks.close();
        // A fifth of the time, at most five seconds, is left for the attempts in flight to stop
        // and the store to be written.
        let margin = (deadline / 5).min(Duration::from_secs(5));
        let delivered = tokio::time::timeout(deadline - margin, self.tasks.wait())
            .await
            .is_ok();
        self.shutdown.cancel();
        if !delivered
            && tokio::time::timeout(margin, self.tasks.wait())
                .await
                .is_err()
        {
            tracing::warn!("delivery workers did not stop within {deadline:?}");
        }
        if let Err(e) = self.shared.store.flush().await {
            tracing::error!("cannot write the delivery store at shutdown: {e}");
        }
        if let Err(e) = self.shared.store.release_claims().await {
            tracing::warn!(
                "cannot give back this replica's claims (they return to the queue when their lease runs out): {e}"
            );
        }
    }
}

/// The report of a delivery whose attempts ended with `last`, its `attempts`-th.
fn report_after(delivery: &Delivery, attempts: u32, last: &AttemptResult) -> DeliveryReport {
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

/// One permit out of several (the last one whole), for one delivery of a request.
fn take_one(permits: &mut Option<OwnedSemaphorePermit>) -> Option<OwnedSemaphorePermit> {
    match permits.as_ref().map(OwnedSemaphorePermit::num_permits) {
        Some(1) => permits.take(),
        Some(_) => permits.as_mut().and_then(|p| p.split(1)),
        None => None,
    }
}

/// Permits of the memory budget for up to `want` deliveries: as many as are free now, or one
/// once it is free. `None` when the worker is cancelled first.
async fn budget_for(
    shared: &EngineContext,
    worker: &WorkerState,
    want: usize,
) -> Option<OwnedSemaphorePermit> {
    let budget = &shared.budget;
    let want = u32::try_from(want.max(1)).unwrap_or(u32::MAX);
    if let Ok(permits) = budget.clone().try_acquire_many_owned(want) {
        return Some(permits);
    }
    let free = u32::try_from(budget.available_permits())
        .unwrap_or(u32::MAX)
        .clamp(1, want);
    tokio::select! {
        () = worker.cancel.cancelled() => None,
        permits = budget.clone().acquire_many_owned(free) => permits.ok(),
    }
}

/// Loads the next part of a webhook's backlog from a disk store into its queue, once the memory
/// budget has room for it (deliveries handed over meanwhile are left to the load).
async fn load_backlog(shared: &EngineContext, worker: &WorkerState) {
    let Some(mut permits) = budget_for(shared, worker, LOAD_BATCH).await else {
        worker.queue.reload();
        return;
    };
    let after = worker.queue.begin_load();
    let want = permits.num_permits();
    match shared.store.claim(&worker.key, after, want).await {
        Ok(found) => {
            let more = found.len() == want;
            let last = found.last().map(|(seq, _)| *seq);
            let mut jobs = Vec::with_capacity(found.len());
            for (seq, delivery) in found {
                let permit = if permits.num_permits() > 1 {
                    permits.split(1)
                } else {
                    None
                };
                jobs.push(Job {
                    delivery,
                    seq: Some(seq),
                    _permit: permit,
                });
            }
            // The last job holds what is left of the permits.
            if let Some(job) = jobs.last_mut() {
                job._permit = Some(permits);
            }
            worker.queue.loaded(jobs, last, more);
        }
        Err(e) => {
            tracing::error!(webhook = %worker.key, "cannot read the webhook's backlog (retrying): {e}");
            worker.queue.reload();
            tokio::select! {
                () = worker.cancel.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Drains a webhook's queue (and its backlog in a disk store), one delivery at a time, and stops
/// when there is nothing left (the next delivery accepted starts a new task) or when the
/// webhook goes away or Herald stops.
async fn run_worker(shared: Arc<EngineContext>, worker: Arc<WorkerState>) {
    let metrics = worker.metrics(&shared);
    let mut breaker = Breaker {
        failures: worker.failures.load(Ordering::Relaxed),
    };
    // Deliveries taken from the queue while a paced or batching webhook waits to send.
    let mut gathering = Gathering::default();
    while !worker.cancel.is_cancelled() {
        if gathering.is_empty() {
            match worker.queue.next() {
                Next::Item(job) => {
                    if !worker.target().gathers() {
                        // Not boxed: this task lives only while its queue holds work, so the
                        // space of the send future inside it is never kept for an idle webhook.
                        let message = job.delivery.clone();
                        let jobs = [job];
                        if deliver(&shared, metrics, &worker, &message, &jobs, &mut breaker).await {
                            worker.release_place(&shared);
                        }
                        worker.failures.store(breaker.failures, Ordering::Relaxed);
                        continue;
                    }
                    let alerts = job.delivery.alerts.len();
                    gathering.push(job, alerts);
                }
                Next::Load => {
                    load_backlog(&shared, &worker).await;
                    continue;
                }
                Next::Stop => return,
            }
        }
        // A paced or batching webhook: gather what is queued while it waits, then send it as
        // one message.
        let target = worker.target();
        let pull = || {
            let job = worker.queue.try_pop()?;
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
        let message = match parts.as_slice() {
            [] => continue,
            [one] => one.clone(),
            _ => match Delivery::merged(&parts) {
                Some(merged) => Arc::new(merged),
                None => continue,
            },
        };
        if deliver(&shared, metrics, &worker, &message, &jobs, &mut breaker).await {
            for _ in &jobs {
                worker.release_place(&shared);
            }
        }
        worker.failures.store(breaker.failures, Ordering::Relaxed);
    }
    // Cancelled: nothing more is queued, and what is left goes.
    let gathered: Vec<Job> = gathering.drain().collect();
    let _ = worker.queue.close();
    give_up_queued(
        &shared,
        &worker,
        gathered
            .into_iter()
            .chain(std::iter::from_fn(|| worker.queue.try_pop())),
    );
}

/// Lets go of a cancelled webhook's queued deliveries: when Herald is stopping, or the store is
/// on disk, they stay pending in the store; when the webhook went away from a memory store they
/// are dropped and recorded.
fn give_up_queued(
    shared: &EngineContext,
    worker: &WorkerState,
    jobs: impl IntoIterator<Item = Job>,
) {
    let mut left = 0usize;
    for job in jobs {
        if leave_or_drop(shared, &job) {
            worker.release_place(shared);
        } else {
            left += 1;
        }
    }
    if left > 0 && shared.stopping.is_cancelled() {
        if shared.store.is_durable() {
            tracing::info!(webhook = %worker.key, deliveries = left, "stopping; queued deliveries stay in the store for the next start");
        } else {
            tracing::warn!(webhook = %worker.key, deliveries = left, "stopping without --data-dir: queued deliveries are lost");
        }
    }
}

/// A delivery interrupted by cancellation: kept pending when Herald is stopping or the store is
/// on disk (resumed at the next start, or when its webhook comes back), dropped and recorded
/// when its webhook went away from a memory store. Returns whether it ended.
fn leave_or_drop(shared: &EngineContext, job: &Job) -> bool {
    if shared.stopping.is_cancelled() || shared.store.is_durable() {
        // A shared store's claim is let go of (when stopping, all are given back at once).
        if !shared.stopping.is_cancelled()
            && let Some(seq) = job.seq
        {
            shared.store.let_go(seq);
        }
        return false;
    }
    shared.dropped(
        &job.delivery,
        job.seq,
        "the webhook was removed or can no longer deliver",
    );
    true
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
fn export_breaker(shared: &EngineContext, key: &ObjectKey, was_open: bool, breaker: &Breaker) {
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

/// Reports the end of a message: for a merged one, the end of each delivery it carried.
fn report_all(
    shared: &EngineContext,
    report: DeliveryReport,
    message: &Arc<Delivery>,
    jobs: &[Job],
    metrics: Option<&WebhookMetrics>,
) {
    if let [job] = jobs
        && Arc::ptr_eq(&job.delivery, message)
    {
        shared.report(report, message, job.seq, metrics);
        return;
    }
    let merged = format!(
        "sent in merged message {} with {} alerts of {} deliveries",
        message.id,
        message.alerts.len(),
        jobs.len()
    );
    for job in jobs {
        let part = &job.delivery;
        let mut own = report.clone();
        own.delivery_id = part.id;
        own.test = part.test;
        own.alerts = part.alerts.len();
        own.message = if own.message.is_empty() {
            merged.clone()
        } else {
            format!("{}; {merged}", own.message)
        };
        shared.report(own, part, job.seq, metrics);
    }
}

/// Lets go of every delivery of an interrupted message (see [`leave_or_drop`]); returns
/// whether they ended.
fn leave_or_drop_all(shared: &EngineContext, jobs: &[Job]) -> bool {
    // Every job is let go of, whatever the others did.
    let ended = jobs.iter().filter(|job| leave_or_drop(shared, job)).count();
    ended == jobs.len()
}

/// Delivers one message (one job, or the jobs merged into it) with its retries; returns
/// whether it ended (it stays in the store when Herald stops first).
async fn deliver(
    shared: &EngineContext,
    metrics: &WebhookMetrics,
    worker: &WorkerState,
    delivery: &Arc<Delivery>,
    jobs: &[Job],
    breaker: &mut Breaker,
) -> bool {
    let cancel = &worker.cancel;
    let policy = shared.config.retry;
    if let Some(wait) = breaker.cool_down(&policy) {
        tracing::debug!(webhook = %delivery.webhook, ?wait, "circuit open: waiting before probing the endpoint");
        tokio::select! {
            () = cancel.cancelled() => return leave_or_drop_all(shared, jobs),
            () = tokio::time::sleep(wait) => {}
        }
    }
    // A delivery another replica tried before continues its schedule.
    let resumed = jobs
        .iter()
        .filter_map(|job| shared.store.resumed(job.seq?))
        .max_by_key(|schedule| schedule.attempts);
    let mut started = tokio::time::Instant::now();
    let mut attempt = 0u32;
    if let Some(schedule) = resumed {
        let now = SystemTime::now();
        let since_first = now
            .duration_since(schedule.first_attempt)
            .unwrap_or_default();
        started = started.checked_sub(since_first).unwrap_or(started);
        attempt = schedule.attempts;
        let wait = schedule
            .next_attempt
            .duration_since(now)
            .unwrap_or_default();
        tracing::debug!(webhook = %delivery.webhook, delivery = %delivery.id, attempts = attempt, ?wait, "continuing the retries of a delivery taken over");
        tokio::select! {
            () = cancel.cancelled() => return leave_or_drop_all(shared, jobs),
            () = tokio::time::sleep(wait) => {}
        }
    }
    loop {
        attempt += 1;
        let current = worker.target();
        // A retry is a message too: it waits its turn at a paced destination (and out a block
        // the destination asked for).
        if attempt > 1
            && let Some(pacer) = current.pacer()
            && !pace::take_turn(pacer, cancel).await
        {
            return leave_or_drop_all(shared, jobs);
        }
        let result = send(&current, delivery).await;
        metrics.duration.observe(result.latency.as_secs_f64());
        let was_open = breaker.is_open();
        breaker.record(result.class);
        export_breaker(shared, &delivery.webhook, was_open, breaker);
        if result.class != AttemptClass::Retryable {
            report_all(
                shared,
                report_after(delivery, attempt, &result),
                delivery,
                jobs,
                Some(metrics),
            );
            return true;
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
            let mut report = report_after(delivery, attempt, &result);
            report.message = format!("gave up after {attempt} attempts: {}", report.message);
            report_all(shared, report, delivery, jobs, Some(metrics));
            return true;
        }
        shared.metrics.delivery(&delivery.webhook, "retried");
        let now = SystemTime::now();
        let schedule = RetrySchedule {
            attempts: attempt,
            first_attempt: now.checked_sub(started.elapsed()).unwrap_or(now),
            next_attempt: now + delay,
        };
        for seq in jobs.iter().filter_map(|job| job.seq) {
            shared.store.retrying(seq, schedule);
        }
        tracing::debug!(
            webhook = %delivery.webhook, delivery = %delivery.id, attempt,
            error = ?result.error, ?delay, "attempt failed; retrying"
        );
        tokio::select! {
            () = cancel.cancelled() => return leave_or_drop_all(shared, jobs),
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
