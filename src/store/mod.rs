//! The delivery store: accepted deliveries that are not finished yet (so a restart resumes them)
//! and a bounded record of finished ones (recent deliveries and dead letters). On disk with
//! `--data-dir` (redb, crash-safe), in PostgreSQL with `--database-url` (one queue shared by
//! every replica), in memory otherwise.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use foldhash::HashMap;
use k8s_openapi::jiff::Timestamp;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::object::ObjectKey;
use crate::outgoing::{Delivery, DeliveryId, ReportOutcome};

mod disk;
mod log;
mod postgres;

use disk::{DiskStore, RECORDS};
pub use postgres::PostgresOptions;
use postgres::PostgresStore;

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or written.
    #[error("delivery store: {0}")]
    Database(String),
    /// A stored value does not decode.
    #[error("delivery store: corrupt entry {key}: {message}")]
    Corrupt {
        /// The entry's key.
        key: String,
        /// The decoding error.
        message: String,
    },
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Database(e.to_string())
}

/// The error of a store whose writer (thread or task) is gone.
fn writer_stopped() -> StoreError {
    StoreError::Database("the store writer has stopped".into())
}

/// What a store's writer answered, or [`writer_stopped`] when it went away first.
async fn written<T>(
    answer: tokio::sync::oneshot::Receiver<Result<T, StoreError>>,
) -> Result<T, StoreError> {
    answer.await.map_err(|_| writer_stopped())?
}

/// Called by a store's writer once the deliveries of one append are committed, before the
/// append returns: with their sequence numbers and, for each, whether this replica holds it
/// (always, but in a shared store, where a delivery is held only when it was claimed for this
/// replica as it was written). Calls follow the order of the sequence numbers, so that the
/// engine can hand fresh deliveries to their workers without reading them back.
pub type HandOver = Box<dyn FnOnce(&[u64], &[bool]) + Send>;

/// One finished delivery, as `herald deliveries` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRecord {
    /// The delivery id, also its Idempotency-Key.
    pub id: DeliveryId,
    /// The webhook.
    pub webhook: ObjectKey,
    /// When it finished (RFC 3339 in JSON).
    #[serde(with = "rfc3339")]
    pub time: Timestamp,
    /// Number of alerts.
    pub alerts: usize,
    /// Attempts made.
    pub attempts: u32,
    /// Succeeded, Failed or Dropped.
    pub outcome: ReportOutcome,
    /// The last HTTP status, when the endpoint answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Latency of the last attempt, in milliseconds.
    pub latency_ms: u64,
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// A test message.
    #[serde(default)]
    pub test: bool,
    /// The content, kept for dead letters (so they can be replayed) and for every delivery with
    /// `--record-bodies`. Never holds credentials or signatures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Arc<Delivery>>,
}

/// A timestamp as RFC 3339 text.
mod rfc3339 {
    use k8s_openapi::jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(time)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a delivery's retries stand: kept in a shared store's row when a retry is scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    /// Attempts made so far (all failed).
    pub attempts: u32,
    /// When the first attempt started (the retry time limit counts from it).
    pub first_attempt: std::time::SystemTime,
    /// When the next attempt is due.
    pub next_attempt: std::time::SystemTime,
}

/// How many records are kept per webhook.
#[derive(Clone, Copy, Debug)]
pub struct RecordLimits {
    /// Succeeded deliveries kept per webhook.
    pub per_webhook: usize,
    /// Failed and dropped deliveries (dead letters) kept per webhook.
    pub dead_letters: usize,
    /// Keep the content of every delivery, not only of dead letters.
    pub record_bodies: bool,
    /// Records kept in all, oldest dropped first: bounds memory (and the in-memory index of a
    /// disk store) however many webhooks there are.
    pub total: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            per_webhook: 100,
            dead_letters: 1000,
            record_bodies: false,
            total: 50_000,
        }
    }
}

impl RecordLimits {
    /// How many records of a class are kept per webhook.
    fn per_class(&self, class: RecordClass) -> usize {
        match class {
            RecordClass::Success => self.per_webhook,
            RecordClass::DeadLetter => self.dead_letters,
        }
    }
}

/// Which records to list.
#[derive(Clone, Debug, Default)]
pub struct RecordFilter {
    /// Only this webhook.
    pub webhook: Option<ObjectKey>,
    /// Only this outcome.
    pub outcome: Option<ReportOutcome>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// What a record is kept as: a success, or a dead letter (a delivery that failed or was
/// dropped, kept longer and with its content).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecordClass {
    Success,
    DeadLetter,
}

impl RecordClass {
    /// The class of a record.
    fn of(record: &DeliveryRecord) -> Self {
        if record.outcome == ReportOutcome::Succeeded {
            RecordClass::Success
        } else {
            RecordClass::DeadLetter
        }
    }
}

/// One value per record class (a webhook's records are kept apart by class).
#[derive(Debug, Default)]
struct ByClass<T> {
    success: T,
    dead_letter: T,
}

impl<T> ByClass<T> {
    /// The values, successes first.
    fn iter(&self) -> impl Iterator<Item = &T> {
        [&self.success, &self.dead_letter].into_iter()
    }

    /// The values, successes first, to change.
    fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        [&mut self.success, &mut self.dead_letter].into_iter()
    }

    /// The values with their classes.
    fn by_class(&self) -> impl Iterator<Item = (RecordClass, &T)> {
        [
            (RecordClass::Success, &self.success),
            (RecordClass::DeadLetter, &self.dead_letter),
        ]
        .into_iter()
    }
}

impl<T> std::ops::Index<RecordClass> for ByClass<T> {
    type Output = T;
    fn index(&self, class: RecordClass) -> &T {
        match class {
            RecordClass::Success => &self.success,
            RecordClass::DeadLetter => &self.dead_letter,
        }
    }
}

impl<T> std::ops::IndexMut<RecordClass> for ByClass<T> {
    fn index_mut(&mut self, class: RecordClass) -> &mut T {
        match class {
            RecordClass::Success => &mut self.success,
            RecordClass::DeadLetter => &mut self.dead_letter,
        }
    }
}

/// A record as a memory store holds it: in its webhook's ring, so without the webhook's key
/// and without a box of its own.
#[derive(Debug)]
struct StoredRecord {
    id: DeliveryId,
    time: Timestamp,
    alerts: usize,
    attempts: u32,
    outcome: ReportOutcome,
    http_status: Option<u16>,
    latency_ms: u64,
    error: String,
    test: bool,
    delivery: Option<Arc<Delivery>>,
}

impl StoredRecord {
    /// The record without its webhook, and the webhook.
    fn split(record: DeliveryRecord) -> (ObjectKey, StoredRecord) {
        let stored = StoredRecord {
            id: record.id,
            time: record.time,
            alerts: record.alerts,
            attempts: record.attempts,
            outcome: record.outcome,
            http_status: record.http_status,
            latency_ms: record.latency_ms,
            error: record.error,
            test: record.test,
            delivery: record.delivery,
        };
        (record.webhook, stored)
    }

    fn to_record(&self, webhook: &ObjectKey) -> DeliveryRecord {
        DeliveryRecord {
            id: self.id,
            webhook: webhook.clone(),
            time: self.time,
            alerts: self.alerts,
            attempts: self.attempts,
            outcome: self.outcome,
            http_status: self.http_status,
            latency_ms: self.latency_ms,
            error: self.error.clone(),
            test: self.test,
            delivery: self.delivery.clone(),
        }
    }
}

/// One webhook's records in id order (so oldest first): kept, then dead letters.
type Rings = ByClass<VecDeque<StoredRecord>>;

/// Finished deliveries in memory: each webhook's records in two rings in id order, kept and
/// dead letters apart, so that recording one appends it to its ring and pruning its webhook's
/// oldest pops the front, with no store-wide ordered map.
#[derive(Default)]
struct MemoryRecords {
    by_webhook: HashMap<ObjectKey, Rings>,
    /// Every record's id and webhook in the order they were recorded, for the store-wide cap
    /// (oldest first). An entry whose record its webhook's own limit already pruned stays until
    /// it reaches the front or the queue is compacted.
    order: VecDeque<(DeliveryId, ObjectKey)>,
    /// Records held.
    len: usize,
}

impl MemoryRecords {
    /// Records a finished delivery (replacing a record with the same id: a replay), then
    /// drops what is over the limits, oldest first.
    fn insert(&mut self, record: DeliveryRecord, limits: &RecordLimits) {
        let class = RecordClass::of(&record);
        let (webhook, record) = StoredRecord::split(record);
        let id = record.id;
        let rings = match self.by_webhook.get_mut(&webhook) {
            Some(rings) => rings,
            None => self.by_webhook.entry(webhook.clone()).or_default(),
        };
        // A webhook's deliveries finish in the order they were accepted: nearly every record
        // is the newest of its webhook and goes at the end without a search.
        let newest = rings
            .iter()
            .all(|ring| ring.back().is_none_or(|last| last.id < id));
        if !newest {
            for ring in rings.iter_mut() {
                if let Ok(at) = ring.binary_search_by(|r| r.id.cmp(&id)) {
                    ring.remove(at);
                    self.len -= 1;
                }
            }
        }
        let ring = &mut rings[class];
        if newest {
            ring.push_back(record);
        } else {
            let at = ring.partition_point(|r| r.id < id);
            ring.insert(at, record);
        }
        self.len += 1;
        let limit = limits.per_class(class);
        while ring.len() > limit {
            ring.pop_front();
            self.len -= 1;
        }
        self.order.push_back((id, webhook));
        while self.len > limits.total.max(1) {
            let Some((id, webhook)) = self.order.pop_front() else {
                break;
            };
            self.remove(id, &webhook);
        }
        // Entries of records pruned by their webhook's limit: dropped once they outnumber
        // the records.
        if self.order.len() > 2 * self.len + 1024 {
            let by_webhook = &self.by_webhook;
            self.order
                .retain(|(id, webhook)| find(by_webhook, *id, webhook).is_some());
        }
    }

    /// Forgets one record, if it is still held.
    fn remove(&mut self, id: DeliveryId, webhook: &ObjectKey) {
        let Some((class, at)) = find(&self.by_webhook, id, webhook) else {
            return;
        };
        if let Some(rings) = self.by_webhook.get_mut(webhook) {
            rings[class].remove(at);
            self.len -= 1;
            if rings.iter().all(VecDeque::is_empty) {
                self.by_webhook.remove(webhook);
            }
        }
    }

    /// The record with this id, wherever it is.
    fn get(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.by_webhook.iter().find_map(|(webhook, rings)| {
            rings.iter().find_map(|ring| {
                let at = ring.binary_search_by(|r| r.id.cmp(&id)).ok()?;
                ring.get(at).map(|r| r.to_record(webhook))
            })
        })
    }

    /// Every record, or one webhook's, with its webhook, in no particular order.
    fn iter<'a>(
        &'a self,
        webhook: Option<&'a ObjectKey>,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a StoredRecord)> + 'a {
        self.by_webhook
            .iter()
            .filter(move |(key, _)| webhook.is_none_or(|w| *key == w))
            .flat_map(|(key, rings)| rings.iter().flatten().map(move |r| (key, r)))
    }
}

/// Where a record is among its webhook's rings: `(class, position)`.
fn find(
    by_webhook: &HashMap<ObjectKey, Rings>,
    id: DeliveryId,
    webhook: &ObjectKey,
) -> Option<(RecordClass, usize)> {
    let rings = by_webhook.get(webhook)?;
    rings.by_class().find_map(|(class, ring)| {
        ring.binary_search_by(|r| r.id.cmp(&id))
            .ok()
            .map(|at| (class, at))
    })
}

enum Backend {
    /// Records only: a memory store is empty at every start, so there is never anything
    /// pending to resume, and its backlog lives in the engine's queues.
    Memory(Mutex<MemoryRecords>),
    /// Backlog and records in redb, written in group commits.
    Disk(DiskStore),
    /// Backlog and records in PostgreSQL, shared by every replica.
    Postgres(PostgresStore),
}

/// The delivery store.
///
/// What a store must do, whatever keeps it: [`Store::append`] keeps accepted deliveries and
/// returns once they survive a crash, with a sequence number per delivery that orders its
/// webhook's backlog; [`Store::load`] reads a webhook's backlog after a sequence number;
/// [`Store::finish`] removes a delivery from the backlog and records it (without waiting: a
/// crash before it is written means the delivery is sent again, with the same Idempotency-Key);
/// [`Store::backlog`] counts each webhook's backlog at start.
pub struct Store {
    backend: Backend,
    limits: RecordLimits,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("durable", &self.is_durable())
            .finish()
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings, numbers and maps always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

impl Store {
    /// A store in memory: lost on exit.
    pub fn memory(limits: RecordLimits) -> Self {
        Store {
            backend: Backend::Memory(Mutex::new(MemoryRecords::default())),
            limits,
        }
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, limits: RecordLimits) -> Result<Self, StoreError> {
        Ok(Store {
            backend: Backend::Disk(DiskStore::open(dir, limits)?),
            limits,
        })
    }

    /// Connects to PostgreSQL, migrating its schema if needed.
    pub async fn postgres(
        options: PostgresOptions,
        limits: RecordLimits,
    ) -> Result<Self, StoreError> {
        Ok(Store {
            backend: Backend::Postgres(PostgresStore::connect(options, limits).await?),
            limits,
        })
    }

    /// Whether accepted deliveries survive a restart.
    pub fn is_durable(&self) -> bool {
        matches!(self.backend, Backend::Disk(_) | Backend::Postgres(_))
    }

    /// Whether several replicas share the backlog: work is claimed from the store rather than
    /// loaded, and other replicas may add to a webhook's backlog.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Whether the store can take writes now (a database that does not answer cannot).
    pub fn is_healthy(&self) -> bool {
        match &self.backend {
            Backend::Postgres(store) => store.is_healthy(),
            _ => true,
        }
    }

    /// For a shared store: notified when any replica stores deliveries, and how often to look
    /// for claimable work when no notification comes.
    pub fn wakeups(&self) -> Option<(Arc<tokio::sync::Notify>, std::time::Duration)> {
        match &self.backend {
            Backend::Postgres(store) => Some((store.wakeup().clone(), store.poll_interval())),
            _ => None,
        }
    }

    /// For a shared store: how often to look for the deliveries of webhooks deleted everywhere
    /// (see [`Store::orphaned`]).
    pub fn orphan_sweep_every(&self) -> std::time::Duration {
        match &self.backend {
            Backend::Postgres(store) => store.orphan_sweep_every(),
            _ => std::time::Duration::from_secs(60),
        }
    }

    /// For a shared store: webhooks whose deliveries no replica has claimed for long (see
    /// the PostgreSQL store): deleted everywhere, their deliveries are to be dropped.
    pub async fn orphaned(&self) -> Result<Vec<ObjectKey>, StoreError> {
        match &self.backend {
            Backend::Postgres(store) => store.orphaned().await,
            _ => Ok(Vec::new()),
        }
    }

    /// For a shared store: stops renewing this replica's claim on a delivery it will not send
    /// (its webhook went away here), so that the delivery returns to the queue once the lease
    /// runs out.
    pub fn let_go(&self, seq: u64) {
        if let Backend::Postgres(store) = &self.backend {
            store.let_go(seq);
        }
    }

    /// For a shared store: keeps a delivery's retry schedule in its row (`seq`), so that a
    /// replica taking the delivery over continues it (attempt count, dead-letter limit, time of
    /// the next attempt) instead of starting again. Written with the next batch, nobody waits;
    /// only where this replica's claim still holds. Other stores keep retries in memory.
    pub fn retrying(&self, seq: u64, schedule: RetrySchedule) {
        if let Backend::Postgres(store) = &self.backend {
            store.retrying(seq, schedule);
        }
    }

    /// For a shared store: the retry schedule stored with a delivery this replica claimed
    /// (a delivery another replica had tried before it), taken once.
    pub fn resumed(&self, seq: u64) -> Option<RetrySchedule> {
        match &self.backend {
            Backend::Postgres(store) => store.resumed(seq),
            _ => None,
        }
    }

    /// For a shared store: the webhooks named by notifications since the last call (empty
    /// when the wakeup came without names: look at every webhook).
    pub fn take_notified(&self) -> Vec<ObjectKey> {
        match &self.backend {
            Backend::Postgres(store) => store.take_notified(),
            _ => Vec::new(),
        }
    }

    /// For a shared store: each webhook's backlog as `(webhook, deliveries, claimable now)`.
    pub async fn waiting(&self) -> Result<Vec<(ObjectKey, usize, usize)>, StoreError> {
        match &self.backend {
            Backend::Postgres(store) => store.waiting().await,
            _ => Ok(Vec::new()),
        }
    }

    /// The next part of a webhook's backlog for its worker: read after the cursor `after`
    /// (a disk store), or claimed for this replica with a lease (a shared store, where the
    /// cursor means nothing: whatever nobody holds is claimed, in order).
    pub async fn claim(
        &self,
        webhook: &ObjectKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Delivery>)>, StoreError> {
        match &self.backend {
            Backend::Postgres(store) => store.claim(webhook, limit).await,
            _ => self.load(webhook, after, limit),
        }
    }

    /// Every delivery of a webhook's backlog after `after`, held or not, without claiming it.
    pub async fn pending(
        &self,
        webhook: &ObjectKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Delivery>)>, StoreError> {
        match &self.backend {
            Backend::Postgres(store) => store.peek(webhook, after, limit).await,
            _ => self.load(webhook, after, limit),
        }
    }

    /// Gives back what this replica holds of a shared store (at shutdown), so other replicas
    /// take it over at once.
    pub async fn release_claims(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(store) => store.release_claims().await,
            _ => Ok(()),
        }
    }

    /// Whether a record with this outcome keeps the delivery's content: dead letters always (so
    /// they can be replayed), successes only with `--record-bodies`.
    pub fn keeps_content(&self, outcome: ReportOutcome) -> bool {
        outcome != ReportOutcome::Succeeded || self.limits.record_bodies
    }

    /// The record limits.
    pub fn limits(&self) -> RecordLimits {
        self.limits
    }

    fn memory_records(records: &Mutex<MemoryRecords>) -> std::sync::MutexGuard<'_, MemoryRecords> {
        records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps accepted deliveries in the backlog and returns, once they would survive a crash,
    /// their sequence numbers (increasing in the order they were stored). Concurrent calls share
    /// one write. A memory store keeps nothing here (the engine's queues hold its backlog) and
    /// numbers nothing.
    pub async fn append(&self, deliveries: &[Arc<Delivery>]) -> Result<Vec<u64>, StoreError> {
        self.append_handing_over(deliveries, None).await
    }

    /// [`Store::append`], calling `hand_over` once the deliveries are kept (see [`HandOver`]).
    pub async fn append_handing_over(
        &self,
        deliveries: &[Arc<Delivery>],
        hand_over: Option<HandOver>,
    ) -> Result<Vec<u64>, StoreError> {
        match &self.backend {
            Backend::Memory(_) => Ok(vec![0; deliveries.len()]),
            Backend::Disk(disk) => disk.append(deliveries, hand_over).await,
            Backend::Postgres(store) => store.append(deliveries, hand_over).await,
        }
    }

    /// Up to `limit` deliveries of a webhook's backlog with a sequence number above `after`,
    /// in order (always none for a memory store, and for a shared store, whose backlog is
    /// claimed: see [`Store::claim`]).
    pub fn load(
        &self,
        webhook: &ObjectKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Delivery>)>, StoreError> {
        match &self.backend {
            Backend::Memory(_) | Backend::Postgres(_) => Ok(Vec::new()),
            Backend::Disk(disk) => disk.load(webhook, after, limit),
        }
    }

    /// How many deliveries each webhook has in the backlog (at start, to resume them; always
    /// none for a memory store, and for a shared store, whose workers find their work through
    /// [`Store::waiting`]).
    pub fn backlog(&self) -> Result<Vec<(ObjectKey, usize)>, StoreError> {
        match &self.backend {
            Backend::Memory(_) | Backend::Postgres(_) => Ok(Vec::new()),
            Backend::Disk(disk) => disk.backlog(),
        }
    }

    /// Finishes a delivery: out of the backlog (its row `seq`, when it has one), recorded, older
    /// records past the limits pruned. A disk store writes it with the next batch without
    /// waiting for the disk: after a crash a finished delivery may be sent again (with the same
    /// Idempotency-Key), never lost.
    pub fn finish(&self, seq: Option<u64>, mut record: DeliveryRecord) -> Result<(), StoreError> {
        if !self.keeps_content(record.outcome) {
            record.delivery = None;
        }
        match &self.backend {
            Backend::Memory(records) => {
                Self::memory_records(records).insert(record, &self.limits);
                Ok(())
            }
            Backend::Disk(disk) => disk.finish(seq, record),
            Backend::Postgres(store) => store.finish(seq, record),
        }
    }

    /// Makes every write so far durable (at shutdown), and applies the record limits where
    /// they are applied in the background.
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Memory(_) => Ok(()),
            Backend::Postgres(store) => store.flush().await,
            Backend::Disk(disk) => disk.flush().await.map_err(|_| writer_stopped())?,
        }
    }

    /// Waits for every write so far, from outside the async runtime.
    #[cfg(test)]
    fn flush_blocking(&self) {
        if let Backend::Disk(disk) = &self.backend {
            disk.flush()
                .blocking_recv()
                .expect("writer answers")
                .expect("flushed");
        }
    }

    /// One record by id.
    pub async fn record(&self, id: &str) -> Result<Option<DeliveryRecord>, StoreError> {
        // Whatever is not an id names no record.
        let Ok(parsed) = id.parse::<DeliveryId>() else {
            return Ok(None);
        };
        match &self.backend {
            Backend::Memory(records) => Ok(Self::memory_records(records).get(parsed)),
            Backend::Postgres(store) => store.record(&parsed.to_string()).await,
            Backend::Disk(disk) => {
                disk.show_records().await?;
                let txn = disk.database().begin_read().map_err(db)?;
                let table = txn.open_table(RECORDS).map_err(db)?;
                match table.get(id).map_err(db)? {
                    Some(value) => Ok(Some(decode(id, value.value())?)),
                    None => Ok(None),
                }
            }
        }
    }

    /// Records matching a filter, newest first.
    pub async fn records(&self, filter: &RecordFilter) -> Result<Vec<DeliveryRecord>, StoreError> {
        let keep = |r: &DeliveryRecord| {
            filter.webhook.as_ref().is_none_or(|w| &r.webhook == w)
                && filter.outcome.is_none_or(|o| r.outcome == o)
        };
        let limit = if filter.limit == 0 {
            usize::MAX
        } else {
            filter.limit
        };
        match &self.backend {
            Backend::Memory(records) => {
                let records = Self::memory_records(records);
                let mut matching: Vec<(&ObjectKey, &StoredRecord)> = records
                    .iter(filter.webhook.as_ref())
                    .filter(|(_, r)| filter.outcome.is_none_or(|o| r.outcome == o))
                    .collect();
                matching.sort_unstable_by_key(|(_, r)| std::cmp::Reverse(r.id));
                Ok(matching
                    .into_iter()
                    .take(limit)
                    .map(|(webhook, r)| r.to_record(webhook))
                    .collect())
            }
            Backend::Postgres(store) => store.records(filter).await,
            Backend::Disk(disk) => {
                disk.show_records().await?;
                let txn = disk.database().begin_read().map_err(db)?;
                let table = txn.open_table(RECORDS).map_err(db)?;
                let mut out = Vec::new();
                for entry in table.iter().map_err(db)?.rev() {
                    let (key, value) = entry.map_err(db)?;
                    let record: DeliveryRecord = decode(key.value(), value.value())?;
                    if keep(&record) {
                        out.push(record);
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Forgets the record index entry of a record that is being replaced (replay). A memory
    /// store replaces the record when the replay finishes.
    pub(crate) fn unindex(&self, record: &DeliveryRecord) {
        if let Backend::Disk(disk) = &self.backend {
            disk.unindex(record);
        }
    }

    /// [`Store::record`] from outside the runtime.
    #[cfg(test)]
    fn record_now(&self, id: &str) -> Result<Option<DeliveryRecord>, StoreError> {
        tests::block(self.record(id))
    }

    /// [`Store::records`] from outside the runtime.
    #[cfg(test)]
    fn records_now(&self, filter: &RecordFilter) -> Result<Vec<DeliveryRecord>, StoreError> {
        tests::block(self.records(filter))
    }

    /// Record ids the store indexes: the records of a memory store, the per-webhook index of a
    /// disk store.
    #[cfg(test)]
    fn indexed(&self) -> usize {
        self.flush_blocking();
        match &self.backend {
            Backend::Memory(records) => Self::memory_records(records).iter(None).count(),
            Backend::Disk(disk) => disk.indexed(),
            Backend::Postgres(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(webhook: &str) -> Arc<Delivery> {
        Arc::new(Delivery::new(
            webhook.parse().expect("key"),
            vec![],
            Default::default(),
            Arc::from(""),
        ))
    }

    fn record(d: &Arc<Delivery>, outcome: ReportOutcome) -> DeliveryRecord {
        DeliveryRecord {
            id: d.id,
            webhook: d.webhook.clone(),
            time: "2026-11-25T00:00:00Z".parse().expect("time"),
            alerts: 0,
            attempts: 1,
            outcome,
            http_status: Some(200),
            latency_ms: 1,
            error: String::new(),
            test: false,
            delivery: Some(d.clone()),
        }
    }

    pub(super) fn block<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    /// Appends deliveries from outside the runtime.
    fn append(store: &Store, deliveries: &[Arc<Delivery>]) -> Vec<u64> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(store.append(deliveries))
            .expect("append")
    }

    fn backlog_len(store: &Store, webhook: &str) -> usize {
        store
            .load(&webhook.parse().expect("key"), 0, usize::MAX)
            .expect("load")
            .len()
    }

    fn exercise(store: &Store) {
        let a = delivery("ns/a");
        let b = delivery("ns/a");
        let seqs = append(store, &[a.clone(), b.clone()]);
        // Only a durable store keeps a backlog (a memory store's is in the engine's queues).
        let expected = if store.is_durable() { 2 } else { 0 };
        assert_eq!(backlog_len(store, "ns/a"), expected);
        if store.is_durable() {
            assert!(seqs[0] < seqs[1], "numbered in order");
            let rest = store
                .load(&"ns/a".parse().expect("key"), seqs[0], 10)
                .expect("load");
            assert_eq!(rest, vec![(seqs[1], b.clone())], "after a cursor");
        }
        store
            .finish(Some(seqs[0]), record(&a, ReportOutcome::Succeeded))
            .expect("finish");
        store
            .finish(Some(seqs[1]), record(&b, ReportOutcome::Failed))
            .expect("finish");
        store.flush_blocking();
        assert_eq!(backlog_len(store, "ns/a"), 0);
        let ok = store
            .record_now(&a.id.to_string())
            .expect("read")
            .expect("kept");
        assert_eq!(
            ok.delivery, None,
            "bodies are not kept for successes by default"
        );
        let dead = store
            .record_now(&b.id.to_string())
            .expect("read")
            .expect("kept");
        assert!(
            dead.delivery.is_some(),
            "dead letters keep their content for replay"
        );
        let failed = store
            .records_now(&RecordFilter {
                outcome: Some(ReportOutcome::Failed),
                ..Default::default()
            })
            .expect("list");
        assert_eq!(failed.len(), 1);
        // Limits: 2 successes kept per webhook.
        for _ in 0..5 {
            let d = delivery("ns/a");
            store
                .finish(None, record(&d, ReportOutcome::Succeeded))
                .expect("finish");
        }
        store.flush_blocking();
        let kept = store
            .records_now(&RecordFilter {
                webhook: Some("ns/a".parse().expect("key")),
                outcome: Some(ReportOutcome::Succeeded),
                limit: 0,
            })
            .expect("list");
        assert_eq!(kept.len(), 2);
        assert!(kept[0].id > kept[1].id, "newest first");
    }

    fn limits() -> RecordLimits {
        RecordLimits {
            per_webhook: 2,
            dead_letters: 3,
            record_bodies: false,
            total: 100,
        }
    }

    #[test]
    fn memory_store_keeps_bounded_records() {
        exercise(&Store::memory(limits()));
    }

    /// Many webhooks: the total cap drops the oldest records whatever their webhook.
    fn exercise_total_cap(store: &Store) {
        let mut finished = Vec::new();
        for i in 0..250 {
            let d = delivery(&format!("ns/w{}", i % 50));
            let outcome = if i % 3 == 0 {
                ReportOutcome::Failed
            } else {
                ReportOutcome::Succeeded
            };
            store.finish(None, record(&d, outcome)).expect("finish");
            finished.push(d.id);
        }
        store.flush_blocking();
        let all = store
            .records_now(&RecordFilter {
                limit: 0,
                ..RecordFilter::default()
            })
            .expect("list");
        assert_eq!(all.len(), 100, "the total cap holds");
        let newest: Vec<&DeliveryId> = finished.iter().rev().take(100).collect();
        let kept: Vec<&DeliveryId> = all.iter().map(|r| &r.id).collect();
        assert_eq!(kept, newest, "the newest records are the ones kept");
        assert_eq!(store.indexed(), 100, "the index forgets evicted records");
    }

    /// A replay finishes with the id of the record it replays: one record remains, with the
    /// new outcome.
    fn exercise_replay(store: &Store) {
        let d = delivery("ns/a");
        let newer = delivery("ns/a");
        store
            .finish(None, record(&d, ReportOutcome::Failed))
            .expect("finish");
        store
            .finish(None, record(&newer, ReportOutcome::Succeeded))
            .expect("finish");
        store.flush_blocking();
        let old = store
            .record_now(&d.id.to_string())
            .expect("read")
            .expect("kept");
        store.unindex(&old);
        store
            .finish(None, record(&d, ReportOutcome::Succeeded))
            .expect("finish again");
        store.flush_blocking();
        let all = store.records_now(&RecordFilter::default()).expect("list");
        let ids: Vec<DeliveryId> = all.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![newer.id, d.id], "one record per id, newest first");
        assert_eq!(all[1].outcome, ReportOutcome::Succeeded);
        assert_eq!(store.indexed(), 2);
    }

    #[test]
    fn a_replay_replaces_its_record() {
        exercise_replay(&Store::memory(limits()));
        let dir = tempfile::tempdir().expect("tempdir");
        exercise_replay(&Store::open(dir.path(), limits()).expect("open"));
    }

    #[test]
    fn records_pruned_per_webhook_do_not_pile_up_in_the_memory_store() {
        let store = Store::memory(limits());
        for _ in 0..5_000 {
            let d = delivery("ns/a");
            store
                .finish(None, record(&d, ReportOutcome::Succeeded))
                .expect("finish");
        }
        assert_eq!(store.indexed(), 2);
        let Backend::Memory(records) = &store.backend else {
            panic!("a memory store");
        };
        let records = Store::memory_records(records);
        assert_eq!(records.len, 2);
        assert!(
            records.order.len() <= 2 * records.len + 1024,
            "{} entries for {} records",
            records.order.len(),
            records.len
        );
    }

    #[test]
    fn memory_store_caps_records_in_total() {
        exercise_total_cap(&Store::memory(limits_many()));
    }

    #[test]
    fn disk_store_caps_records_in_total() {
        let dir = tempfile::tempdir().expect("tempdir");
        exercise_total_cap(&Store::open(dir.path(), limits_many()).expect("open"));
    }

    fn limits_many() -> RecordLimits {
        RecordLimits {
            per_webhook: 100,
            dead_letters: 100,
            record_bodies: false,
            total: 100,
        }
    }

    #[test]
    fn sequence_numbers_are_never_handed_out_twice_across_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), limits()).expect("open");
        // The newest row belongs to the webhook that sorts first, and is finished.
        let a = delivery("ns/a");
        let seqs = append(&store, &[delivery("ns/z"), a.clone()]);
        store
            .finish(Some(seqs[1]), record(&a, ReportOutcome::Succeeded))
            .expect("finish");
        store.flush_blocking();
        drop(store);
        let reopened = Store::open(dir.path(), limits()).expect("reopen");
        let later = append(&reopened, &[delivery("ns/a")]);
        assert!(later[0] > seqs[1], "{later:?} after {seqs:?}");
    }

    #[test]
    fn disk_store_keeps_pending_and_records_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), limits()).expect("open");
        exercise(&store);
        let pending = delivery("ns/b");
        let seqs = append(&store, std::slice::from_ref(&pending));
        drop(store);
        let reopened = Store::open(dir.path(), limits()).expect("reopen");
        assert_eq!(
            reopened
                .load(&"ns/b".parse().expect("key"), 0, 10)
                .expect("load"),
            vec![(seqs[0], pending)]
        );
        assert_eq!(
            reopened.backlog().expect("backlog"),
            vec![("ns/b".parse().expect("key"), 1)]
        );
        let later = append(&reopened, &[delivery("ns/b")]);
        assert!(later[0] > seqs[0], "numbering goes on after a reopen");
        assert_eq!(
            reopened
                .records_now(&RecordFilter::default())
                .expect("list")
                .len(),
            3
        );
    }
}
