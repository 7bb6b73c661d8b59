//! The disk store: the backlog in an append-only segment log ([`super::log`]), the records
//! in redb, both written by one thread in group commits.
//!
//! Every accepted delivery is an entry of the log with its webhook and a sequence number the
//! writer hands out in commit order, so a webhook's worker reads its backlog in the order it
//! was accepted and a cursor (the last sequence number it loaded) says what it has. Writes go
//! through one channel to one thread, which takes whatever has queued up since its last commit:
//! the deliveries of every request waiting are written as one frame of the log and made durable
//! by one `fdatasync`, and only then are their requests answered. Finished deliveries are
//! collected beside the channel (a finish does not wake the writer) and, every
//! [`SETTLE_EVERY`] (and at a flush), recorded in redb in one durable commit; only then
//! are the finished deliveries' tombstones written to the log: after a crash a finished
//! delivery may be sent again (with the same Idempotency-Key), never lost, and a delivery never
//! leaves the log before its record (a dead letter's content) is durable.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use super::log::{Log, LogReader};
use super::{
    ByClass, DeliveryRecord, HandOver, RecordClass, RecordLimits, StoreError, db, decode, encode,
    writer_stopped, written,
};
use crate::alert::SharedKeptAlerts;
use crate::object::ObjectKey;
use crate::outgoing::{Delivery, DeliveryId};

/// The backlog of earlier versions, `(webhook, sequence number)` to the delivery (JSON), moved
/// into the log at open.
const BACKLOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("backlog");
/// The pending table of earlier versions (keyed by delivery id), moved into the backlog at open.
const OLD_PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");
/// The next sequence number to hand out (key [`NEXT_SEQ`]) as earlier versions wrote it; the
/// log now says it (its newest segment is named by the first number written into it).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";
/// Finished deliveries by id.
pub(super) const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

/// Most operations taken into one transaction.
const MAX_BATCH: usize = 8192;
/// How often the finished deliveries are recorded (durably) and leave the log. Each settle is
/// one redb commit, and the records of a webhook that finishes more than it keeps between two
/// settles are not written at all. A crash sends again what finished since the last settle
/// (with the same Idempotency-Key).
const SETTLE_EVERY: Duration = Duration::from_secs(1);
/// Finished deliveries that are recorded at once, without waiting for [`SETTLE_EVERY`] (bounds
/// the memory they hold, a few hundred bytes each).
const SETTLE_AT: usize = 32_768;

/// A disk store's record ids per webhook, kept in memory to prune without reading the disk.
#[derive(Default)]
pub(super) struct Index {
    /// Record ids per webhook, sorted (so oldest first), apart by record class. Sorted deques
    /// rather than trees: new ids go at the end, and a few ids cost a few bytes, not a node.
    pub(super) by_webhook: HashMap<ObjectKey, ByClass<VecDeque<DeliveryId>>>,
}

impl Index {
    pub(super) fn add(&mut self, record: &DeliveryRecord) {
        let ids = match self.by_webhook.get_mut(&record.webhook) {
            Some(ids) => ids,
            None => self.by_webhook.entry(record.webhook.clone()).or_default(),
        };
        let ids = &mut ids[RecordClass::of(record)];
        // A webhook's deliveries finish in the order they were accepted: nearly every id is
        // the newest of its webhook and goes at the end without a search.
        if ids.back().is_none_or(|last| *last < record.id) {
            ids.push_back(record.id);
            return;
        }
        let at = ids.partition_point(|id| *id < record.id);
        if ids.get(at) != Some(&record.id) {
            ids.insert(at, record.id);
        }
    }

    pub(super) fn remove(&mut self, record: &DeliveryRecord) {
        if let Some(ids) = self.by_webhook.get_mut(&record.webhook) {
            let class_ids = &mut ids[RecordClass::of(record)];
            if let Ok(at) = class_ids.binary_search(&record.id) {
                class_ids.remove(at);
            }
            if ids.iter().all(VecDeque::is_empty) {
                self.by_webhook.remove(&record.webhook);
            }
        }
    }

    /// Removes the ids beyond the limit for this record's webhook and class, oldest first, and
    /// hands each to `forget`.
    fn prune(
        &mut self,
        record: &DeliveryRecord,
        limits: &RecordLimits,
        mut forget: impl FnMut(DeliveryId),
    ) {
        let class = RecordClass::of(record);
        let limit = limits.per_class(class);
        let Some(ids) = self.by_webhook.get_mut(&record.webhook) else {
            return;
        };
        let ids = &mut ids[class];
        let excess = ids.len().saturating_sub(limit);
        if excess == 0 {
            return;
        }
        ids.drain(..excess).for_each(&mut forget);
        if ids.capacity() > 2 * ids.len().max(4) {
            ids.shrink_to_fit();
        }
    }
}

/// One piece of work for the writer thread, sent through its channel.
enum Op {
    /// Accepted deliveries (webhook and JSON), answered with their sequence numbers once durable
    /// (after `hand_over` was called with them).
    Append {
        rows: Vec<(String, Vec<u8>)>,
        hand_over: Option<HandOver>,
        reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    },
    /// Finished deliveries wait in [`Finishing`]: settle them when their time comes (sent by
    /// the first finish after a settle, and by the one that fills [`SETTLE_AT`]).
    Settle,
    /// Makes everything written so far durable, then answers.
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// Writes the finished deliveries' records now (so that a read finds them), then answers.
    Show(oneshot::Sender<Result<(), StoreError>>),
    /// The recorder's answer for a batch (see [`Writer::recorded`]).
    Recorded {
        tombstones: Vec<u64>,
        result: Result<(), StoreError>,
        waiting: Vec<Waiting>,
    },
    /// The store is closing: record what is finished, make everything durable, and stop.
    Close,
}

/// A change to the records, collected in [`Finishing`] until the writer settles.
enum Finished {
    /// A finished delivery: its backlog row (if it has one) removed, its record written.
    Delivery {
        seq: Option<u64>,
        record: DeliveryRecord,
    },
    /// A record about to be replaced by a replay leaves the index.
    Unindex(DeliveryRecord),
}

/// Finished deliveries and unindexings waiting for the writer's next settle, in order. They
/// are kept beside the channel, not sent through it, so that a finish does not wake the writer:
/// one wake per settle instead of one per delivery.
type Finishing = Arc<Mutex<Vec<Finished>>>;

/// The disk store: reads from any thread, writes through the writer thread.
pub(super) struct DiskStore {
    database: Arc<redb::Database>,
    log: LogReader,
    /// Alerts of the deliveries read back, shared while any of them is held.
    read_back: SharedKeptAlerts,
    /// The writer's record index, read by tests.
    #[cfg(test)]
    index: Arc<Mutex<Index>>,
    writer: Option<Sender<Op>>,
    finishing: Finishing,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskStore {
    /// Opens (or creates) the database in `dir` and starts its writer.
    pub(super) fn open(dir: &Path, limits: RecordLimits) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Database(format!("creating {}: {e}", dir.display())))?;
        let database = redb::Database::create(dir.join("herald.redb")).map_err(db)?;
        let (mut log, reader, mut next_seq) = Log::open(dir)?;
        let txn = database.begin_write().map_err(db)?;
        {
            let meta = txn.open_table(META).map_err(db)?;
            if let Some(stored) = meta.get(NEXT_SEQ).map_err(db)? {
                next_seq = next_seq.max(stored.value());
            }
            txn.open_table(RECORDS).map_err(db)?;
            // Deliveries pending under earlier layouts join the log: the backlog table's under
            // their numbers, the older pending table's (keyed by id) after them.
            let mut moved: Vec<(u64, String, Vec<u8>)> = Vec::new();
            let backlog = txn.open_table(BACKLOG).map_err(db)?;
            for entry in backlog.iter().map_err(db)? {
                let (key, value) = entry.map_err(db)?;
                let (webhook, seq) = key.value();
                next_seq = next_seq.max(seq + 1);
                moved.push((seq, webhook.to_string(), value.value().to_vec()));
            }
            let old = txn.open_table(OLD_PENDING).map_err(db)?;
            for entry in old.iter().map_err(db)? {
                let (key, value) = entry.map_err(db)?;
                let delivery: Delivery = decode(key.value(), value.value())?;
                moved.push((0, delivery.webhook.to_string(), value.value().to_vec()));
            }
            for row in moved.iter_mut().filter(|row| row.0 == 0) {
                row.0 = next_seq;
                next_seq += 1;
            }
            for part in moved.chunks(4096) {
                log.append(
                    part.iter()
                        .map(|(seq, webhook, body)| (*seq, webhook.as_str(), body.as_slice())),
                )?;
            }
        }
        txn.delete_table(BACKLOG).map_err(db)?;
        txn.delete_table(OLD_PENDING).map_err(db)?;
        txn.commit().map_err(db)?;
        let database = Arc::new(database);
        let mut index = Index::default();
        {
            let txn = database.begin_read().map_err(db)?;
            let table = txn.open_table(RECORDS).map_err(db)?;
            for entry in table.iter().map_err(db)? {
                let (key, value) = entry.map_err(db)?;
                index.add(&decode(key.value(), value.value())?);
            }
        }
        let index = Arc::new(Mutex::new(index));
        let (sender, receiver) = std::sync::mpsc::channel();
        let finishing = Finishing::default();
        let recorder = Recorder {
            database: database.clone(),
            index: index.clone(),
            limits,
        };
        let writer = Writer::new(log, next_seq, finishing.clone(), recorder, sender.clone())?;
        let thread = std::thread::Builder::new()
            .name("herald-store".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| StoreError::Database(format!("starting the store writer: {e}")))?;
        Ok(DiskStore {
            database,
            log: reader,
            read_back: SharedKeptAlerts::default(),
            #[cfg(test)]
            index,
            writer: Some(sender),
            finishing,
            thread: Some(thread),
        })
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        self.writer
            .as_ref()
            .and_then(|w| w.send(op).ok())
            .ok_or_else(writer_stopped)
    }

    /// Stores accepted deliveries; returns their sequence numbers once they are durable, after
    /// handing them to `hand_over` (on the writer thread, in the order of the numbers).
    pub(super) async fn append(
        &self,
        deliveries: &[Arc<Delivery>],
        hand_over: Option<HandOver>,
    ) -> Result<Vec<u64>, StoreError> {
        let rows = deliveries
            .iter()
            .map(|d| (d.webhook.to_string(), d.to_json()))
            .collect();
        let (reply, answer) = oneshot::channel();
        self.send(Op::Append {
            rows,
            hand_over,
            reply,
        })?;
        written(answer).await
    }

    /// Queues a finished delivery for the next batch.
    pub(super) fn finish(
        &self,
        seq: Option<u64>,
        record: DeliveryRecord,
    ) -> Result<(), StoreError> {
        self.collect(Finished::Delivery { seq, record })
    }

    /// Adds a change to the next settle, waking the writer only for the first one since the
    /// last settle and for the one that makes the settle due at once.
    fn collect(&self, finished: Finished) -> Result<(), StoreError> {
        let waiting = {
            let mut finishing = self.finishing.lock().unwrap_or_else(|e| e.into_inner());
            finishing.push(finished);
            finishing.len()
        };
        if waiting == 1 || waiting == SETTLE_AT {
            self.send(Op::Settle)?;
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub(super) fn flush(&self) -> oneshot::Receiver<Result<(), StoreError>> {
        let (reply, answer) = oneshot::channel();
        // A stopped writer drops the reply: the receiver sees it.
        let _ = self.send(Op::Flush(reply));
        answer
    }

    /// Writes the records of every delivery finished so far, for a read that follows.
    pub(super) async fn show_records(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Show(reply))?;
        written(answer).await
    }

    /// Takes a record out of the index (in order with the writes queued before).
    pub(super) fn unindex(&self, record: &DeliveryRecord) {
        let _ = self.collect(Finished::Unindex(record.clone()));
    }

    /// Up to `limit` deliveries of a webhook's backlog after sequence number `after`, in order.
    pub(super) fn load(
        &self,
        webhook: &ObjectKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Delivery>)>, StoreError> {
        let name = webhook.to_string();
        self.log
            .load(&name, after, limit)?
            .into_iter()
            .map(|(seq, bytes)| {
                let delivery = Delivery::from_json(&bytes, &self.read_back).map_err(|e| {
                    StoreError::Corrupt {
                        key: format!("{name} #{seq}"),
                        message: e.to_string(),
                    }
                })?;
                Ok((seq, Arc::new(delivery)))
            })
            .collect()
    }

    /// How many deliveries each webhook has in the backlog.
    pub(super) fn backlog(&self) -> Result<Vec<(ObjectKey, usize)>, StoreError> {
        let counts = self.log.counts();
        counts
            .into_iter()
            .map(|(name, count)| {
                name.parse::<ObjectKey>()
                    .map(|key| (key, count))
                    .map_err(|e| StoreError::Corrupt {
                        key: name.clone(),
                        message: e.to_string(),
                    })
            })
            .collect()
    }

    /// The database, for reading records.
    pub(super) fn database(&self) -> &redb::Database {
        &self.database
    }

    /// Record ids indexed.
    #[cfg(test)]
    pub(super) fn indexed(&self) -> usize {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index
            .by_webhook
            .values()
            .flat_map(ByClass::iter)
            .flatten()
            .count()
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        // The writer commits what it holds durably, then stops.
        if let Some(writer) = self.writer.take() {
            let _ = writer.send(Op::Close);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Appends written less than this long after the previous write of appends wait
/// [`GATHER_FOR`] for more to share their write (see [`gather`]).
const GATHER_WHEN_WITHIN: Duration = Duration::from_millis(1);
/// How long appends wait for others to share their write when writes follow each other
/// closely.
const GATHER_FOR: Duration = Duration::from_micros(500);
/// Appends that make a write worth doing at once.
const GATHER_ENOUGH: usize = 8;

/// Waits up to [`GATHER_FOR`] for more operations to join `ops`, until [`GATHER_ENOUGH`]
/// appends wait; says whether the store is closing (an [`Op::Close`] joined). When requests follow each other closely (a busy Herald), each write and its
/// `fdatasync` would otherwise hold one or two requests; a request then waits a fraction of a
/// millisecond longer, and the writer makes a fraction of the writes. An idle Herald's writes
/// are far apart and never wait.
fn gather(receiver: &Receiver<Op>, ops: &mut Vec<Op>) -> bool {
    let deadline = Instant::now() + GATHER_FOR;
    let appends = |ops: &[Op]| {
        ops.iter()
            .filter(|op| matches!(op, Op::Append { .. }))
            .count()
    };
    while ops.len() < MAX_BATCH && appends(ops) < GATHER_ENOUGH {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match receiver.recv_timeout(left) {
            Ok(op) => {
                let closing = matches!(op, Op::Close);
                ops.push(op);
                if closing {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// The writer thread's state.
struct Writer {
    next_seq: u64,
    log: Log,
    /// Finishes and unindexings collected since the last settle.
    finishing: Finishing,
    /// Whether the collected finishes asked for a settle since the last one.
    kicked: bool,
    /// When the records were last handed to the recorder.
    settled: Instant,
    /// The recorder thread's channel (see [`Recorder`]).
    recorder: Option<Sender<RecordBatch>>,
    recorder_thread: Option<std::thread::JoinHandle<()>>,
    /// A batch is with the recorder: the next one waits for its answer.
    recording: bool,
    /// Flushes and reads waiting for the next batch: each is answered once the records of
    /// everything finished before it are written (and, for a flush, the log is durable).
    waiting: Vec<Waiting>,
}

/// A flush or a read of the records, waiting for the records it must see.
struct Waiting {
    reply: oneshot::Sender<Result<(), StoreError>>,
    /// A flush: the log's tombstones are made durable too.
    flush: bool,
}

/// Finishes handed to the recorder thread in one transaction.
struct RecordBatch {
    finished: Vec<Finished>,
    /// The log entries of those finishes, tombstoned once their records are durable.
    tombstones: Vec<u64>,
    /// Answered once the batch is written.
    waiting: Vec<Waiting>,
}

impl Writer {
    fn new(
        log: Log,
        next_seq: u64,
        finishing: Finishing,
        recorder: Recorder,
        ops: Sender<Op>,
    ) -> Result<Self, StoreError> {
        let (batches, received) = std::sync::mpsc::channel();
        let recorder_thread = std::thread::Builder::new()
            .name("herald-records".into())
            .spawn(move || recorder.run(received, ops))
            .map_err(|e| StoreError::Database(format!("starting the records writer: {e}")))?;
        Ok(Writer {
            next_seq,
            log,
            finishing,
            kicked: false,
            settled: Instant::now(),
            recorder: Some(batches),
            recorder_thread: Some(recorder_thread),
            recording: false,
            waiting: Vec::new(),
        })
    }

    fn run(mut self, receiver: Receiver<Op>) {
        let mut ops = Vec::new();
        // When the last write of appends ended.
        let mut appended_at: Option<Instant> = None;
        loop {
            let first = if self.kicked && !self.recording {
                let wait = SETTLE_EVERY.saturating_sub(self.settled.elapsed());
                match receiver.recv_timeout(wait) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match receiver.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                }
            };
            let mut appends = false;
            let mut closing = false;
            if let Some(op) = first {
                ops.push(op);
                while ops.len() < MAX_BATCH {
                    match receiver.try_recv() {
                        Ok(op) => ops.push(op),
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                appends = ops.iter().any(|op| matches!(op, Op::Append { .. }));
                closing = ops.iter().any(|op| matches!(op, Op::Close));
                let busy = appended_at.is_some_and(|at| at.elapsed() < GATHER_WHEN_WITHIN);
                if busy && appends && !closing {
                    closing = gather(&receiver, &mut ops);
                }
            }
            self.commit(&mut ops);
            if appends {
                appended_at = Some(Instant::now());
            }
            if closing {
                break;
            }
        }
        // The last finishes, recorded and made durable before the process goes.
        let (reply, mut done) = oneshot::channel();
        self.waiting.push(Waiting { reply, flush: true });
        if !self.recording {
            self.settle();
        }
        while matches!(done.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
            match receiver.recv() {
                Ok(op) => {
                    ops.push(op);
                    self.commit(&mut ops);
                }
                Err(_) => break,
            }
        }
        drop(self.recorder.take());
        if let Some(thread) = self.recorder_thread.take() {
            let _ = thread.join();
        }
    }

    /// How many finishes are collected for the next settle.
    fn collected(&self) -> usize {
        self.finishing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Writes a batch and answers whoever waits for it: the appends as one durable frame of
    /// the log, answered at once; the finishes wait, out of the log's index at once, to be
    /// recorded by the recorder thread in one transaction at a flush or a read, once
    /// [`SETTLE_EVERY`] has passed or [`SETTLE_AT`] of them wait. The recorder's answer brings
    /// their tombstones to the log.
    fn commit(&mut self, ops: &mut Vec<Op>) {
        let appended = self.append(ops);
        if let Err(e) = &appended {
            tracing::error!("delivery store: a write failed: {e}");
        }
        let mut seqs = match &appended {
            Ok(seqs) => seqs.clone().into_iter(),
            Err(_) => Vec::new().into_iter(),
        };
        for op in ops.drain(..) {
            match op {
                Op::Append {
                    reply, hand_over, ..
                } => {
                    let answer = match &appended {
                        Ok(_) => {
                            let seqs = seqs.next().unwrap_or_default();
                            if let Some(hand_over) = hand_over {
                                hand_over(&seqs, &vec![true; seqs.len()]);
                            }
                            Ok(seqs)
                        }
                        Err(e) => Err(StoreError::Database(e.to_string())),
                    };
                    let _ = reply.send(answer);
                }
                Op::Settle => self.kicked = true,
                Op::Flush(reply) => self.waiting.push(Waiting { reply, flush: true }),
                Op::Show(reply) => self.waiting.push(Waiting {
                    reply,
                    flush: false,
                }),
                Op::Recorded {
                    tombstones,
                    result,
                    waiting,
                } => self.recorded(tombstones, result, waiting),
                Op::Close => {}
            }
        }
        let due = self.kicked
            && (self.settled.elapsed() >= SETTLE_EVERY || self.collected() >= SETTLE_AT);
        if !self.recording && (due || !self.waiting.is_empty()) {
            self.settle();
        }
    }

    /// Numbers the batch's accepted deliveries and writes them to the log, durably.
    fn append(&mut self, ops: &[Op]) -> Result<Vec<Vec<u64>>, StoreError> {
        let mut seqs = Vec::new();
        let mut rows: Vec<(u64, &str, &[u8])> = Vec::new();
        for op in ops {
            if let Op::Append { rows: appended, .. } = op {
                let mut assigned = Vec::with_capacity(appended.len());
                for (webhook, bytes) in appended {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    rows.push((seq, webhook.as_str(), bytes.as_slice()));
                    assigned.push(seq);
                }
                seqs.push(assigned);
            }
        }
        if !rows.is_empty() {
            self.log.append(rows.iter().copied())?;
        }
        Ok(seqs)
    }

    /// Hands the finishes collected so far, out of the log's index, to the recorder, with the
    /// flushes and reads that wait for them.
    fn settle(&mut self) {
        self.settled = Instant::now();
        self.kicked = false;
        let finished =
            std::mem::take(&mut *self.finishing.lock().unwrap_or_else(|e| e.into_inner()));
        let mut name = String::new();
        let mut tombstones = Vec::new();
        for finished in &finished {
            if let Finished::Delivery {
                seq: Some(seq),
                record,
                ..
            } = finished
            {
                set_name(&mut name, &record.webhook);
                if self.log.finish(&name, *seq) {
                    tombstones.push(*seq);
                }
            }
        }
        let batch = RecordBatch {
            finished,
            tombstones,
            waiting: std::mem::take(&mut self.waiting),
        };
        match self.recorder.as_ref().map(|recorder| recorder.send(batch)) {
            Some(Ok(())) => self.recording = true,
            Some(Err(std::sync::mpsc::SendError(batch))) => {
                self.recorded(Vec::new(), Err(recorder_stopped()), batch.waiting);
            }
            None => {}
        }
    }

    /// The recorder's answer: the records are durable (or could not be written), so their
    /// deliveries' tombstones are written to the log (durably for a flush), and whoever waits
    /// is answered. Deliveries whose records could not be written stay in the log and are sent
    /// again after a restart, with the same Idempotency-Key.
    fn recorded(
        &mut self,
        tombstones: Vec<u64>,
        result: Result<(), StoreError>,
        waiting: Vec<Waiting>,
    ) {
        self.recording = false;
        let result = result.and_then(|()| {
            self.log.tombstone(tombstones);
            self.log
                .write_tombstones(waiting.iter().any(|waiting| waiting.flush))
        });
        if let Err(e) = &result {
            tracing::error!(
                "delivery store: writing records failed (the deliveries stay pending until the next start): {e}"
            );
        }
        for waiting in waiting {
            let _ = waiting.reply.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Database(e.to_string())),
            });
        }
    }
}

fn recorder_stopped() -> StoreError {
    StoreError::Database("the records writer has stopped".into())
}

/// The recorder thread's state: it writes finished deliveries' records, one transaction per
/// batch, apart from the writer thread, so that appends never wait for a records commit.
struct Recorder {
    database: Arc<redb::Database>,
    index: Arc<Mutex<Index>>,
    limits: RecordLimits,
}

impl Recorder {
    fn run(mut self, batches: Receiver<RecordBatch>, writer: Sender<Op>) {
        while let Ok(batch) = batches.recv() {
            let result = if batch.finished.is_empty() {
                Ok(())
            } else {
                self.record(&batch.finished)
            };
            let answer = Op::Recorded {
                tombstones: batch.tombstones,
                result,
                waiting: batch.waiting,
            };
            if writer.send(answer).is_err() {
                return;
            }
        }
    }

    /// Writes records in one durable transaction.
    fn record(&mut self, ops: &[Finished]) -> Result<(), StoreError> {
        let txn = self.database.begin_write().map_err(db)?;
        let mut evicted = Vec::new();
        {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let mut records = txn.open_table(RECORDS).map_err(db)?;
            let mut key = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let mut prune = Vec::new();
            // The records of this batch still kept, each with its finish: one pruned in the
            // same batch (a busy webhook finishes more than its limit between two settles) is
            // never written, and never deleted.
            let mut fresh: HashMap<DeliveryId, &DeliveryRecord> = HashMap::default();
            // Records taken out of the index in this batch to be replaced: still in the table.
            let mut replaced: Vec<DeliveryId> = Vec::new();
            for op in ops {
                match op {
                    Finished::Delivery { record, .. } => {
                        index.add(record);
                        fresh.insert(record.id, record);
                        prune.clear();
                        index.prune(record, &self.limits, |id| prune.push(id));
                        for id in &prune {
                            if fresh.remove(id).is_none() || replaced.contains(id) {
                                records.remove(id.encode(&mut key)).map_err(db)?;
                            }
                        }
                    }
                    Finished::Unindex(record) => {
                        index.remove(record);
                        replaced.push(record.id);
                    }
                }
            }
            let mut fresh: Vec<(DeliveryId, &DeliveryRecord)> = fresh.into_iter().collect();
            // In key order: each insert lands next to the one before.
            fresh.sort_unstable_by_key(|(id, _)| *id);
            for (id, record) in fresh {
                records
                    .insert(id.encode(&mut key), encode(record).as_slice())
                    .map_err(db)?;
            }
            let total = u64::try_from(self.limits.total.max(1)).unwrap_or(u64::MAX);
            while records.len().map_err(db)? > total {
                let Some((key, value)) = records.pop_first().map_err(db)? else {
                    break;
                };
                // An undecodable record is gone either way; its index entry goes with the
                // next prune of its webhook.
                if let Ok(old) = decode::<DeliveryRecord>(key.value(), value.value()) {
                    evicted.push(old);
                }
            }
            for old in &evicted {
                index.remove(old);
            }
        }
        txn.commit().map_err(db)
    }
}

/// Writes a webhook's key into a reused buffer.
fn set_name(buffer: &mut String, webhook: &ObjectKey) {
    use std::fmt::Write as _;
    buffer.clear();
    let _ = write!(buffer, "{webhook}");
}
