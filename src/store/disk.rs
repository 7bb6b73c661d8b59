//! The disk store: redb, written by one thread in group commits.
//!
//! Every accepted delivery is a row of the backlog table keyed by its webhook and a sequence
//! number the writer hands out in commit order, so a webhook's worker reads its backlog in the
//! order it was accepted and a cursor (the last sequence number it loaded) says what it has.
//! Writes go through one channel to one thread, which takes whatever has queued up since its
//! last commit and writes it as one transaction: the deliveries of every request waiting, the
//! finished deliveries to remove and record. A commit that holds accepted deliveries is durable
//! (one fsync for all of them) and only then are their requests answered; a commit of finishes
//! alone is not (after a crash a finished delivery may be sent again, with the same
//! Idempotency-Key, never lost), and the next durable commit makes it durable too.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};

use foldhash::HashMap;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use super::{
    ByClass, DeliveryRecord, HandOver, RecordClass, RecordLimits, StoreError, db, decode, encode,
    writer_stopped, written,
};
use crate::object::ObjectKey;
use crate::outgoing::{Delivery, DeliveryId};

/// Accepted deliveries not finished yet: `(webhook, sequence number)` to the delivery (JSON).
const BACKLOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("backlog");
/// The pending table of earlier versions (keyed by delivery id), moved into the backlog at open.
const OLD_PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");
/// The next sequence number to hand out (key [`NEXT_SEQ`]), written with every append: the
/// backlog alone cannot say it once its newest rows are finished, and numbers must never be
/// handed out twice (a worker's cursor would pass over a row numbered below it).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";
/// Finished deliveries by id.
pub(super) const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

/// Most operations taken into one transaction.
const MAX_BATCH: usize = 8192;

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

/// One piece of work for the writer thread.
enum Op {
    /// Accepted deliveries (webhook and JSON), answered with their sequence numbers once durable
    /// (after `hand_over` was called with them).
    Append {
        rows: Vec<(ObjectKey, Vec<u8>)>,
        hand_over: Option<HandOver>,
        reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    },
    /// A finished delivery: its backlog row (if it has one) removed, its record written.
    Finish {
        seq: Option<u64>,
        record: DeliveryRecord,
        bytes: Vec<u8>,
    },
    /// A record about to be replaced by a replay leaves the index.
    Unindex(DeliveryRecord),
    /// Makes everything written so far durable, then answers.
    Flush(oneshot::Sender<Result<(), StoreError>>),
}

/// The disk store: reads from any thread, writes through the writer thread.
pub(super) struct DiskStore {
    database: Arc<redb::Database>,
    /// The writer's record index, read by tests.
    #[cfg(test)]
    index: Arc<Mutex<Index>>,
    writer: Option<Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskStore {
    /// Opens (or creates) the database in `dir` and starts its writer.
    pub(super) fn open(dir: &Path, limits: RecordLimits) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Database(format!("creating {}: {e}", dir.display())))?;
        let database = redb::Database::create(dir.join("herald.redb")).map_err(db)?;
        let mut next_seq = 1u64;
        let txn = database.begin_write().map_err(db)?;
        {
            let mut meta = txn.open_table(META).map_err(db)?;
            if let Some(stored) = meta.get(NEXT_SEQ).map_err(db)? {
                next_seq = stored.value();
            }
            let mut backlog = txn.open_table(BACKLOG).map_err(db)?;
            // Rows are in webhook order: the highest number is wherever it is.
            for entry in backlog.iter().map_err(db)? {
                let (key, _) = entry.map_err(db)?;
                next_seq = next_seq.max(key.value().1 + 1);
            }
            txn.open_table(RECORDS).map_err(db)?;
            // Deliveries pending under the earlier layout join the backlog in id order.
            let mut old = txn.open_table(OLD_PENDING).map_err(db)?;
            while let Some((key, value)) = old.pop_first().map_err(db)? {
                let delivery: Delivery = decode(key.value(), value.value())?;
                let webhook = delivery.webhook.to_string();
                backlog
                    .insert((webhook.as_str(), next_seq), value.value())
                    .map_err(db)?;
                next_seq += 1;
            }
            meta.insert(NEXT_SEQ, next_seq).map_err(db)?;
        }
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
        let writer = Writer {
            database: database.clone(),
            index: index.clone(),
            limits,
            next_seq,
        };
        let thread = std::thread::Builder::new()
            .name("herald-store".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| StoreError::Database(format!("starting the store writer: {e}")))?;
        Ok(DiskStore {
            database,
            #[cfg(test)]
            index,
            writer: Some(sender),
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
            .map(|d| (d.webhook.clone(), encode(d)))
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
        let bytes = encode(&record);
        self.send(Op::Finish { seq, record, bytes })
    }

    /// Makes every write so far durable.
    pub(super) fn flush(&self) -> oneshot::Receiver<Result<(), StoreError>> {
        let (reply, answer) = oneshot::channel();
        // A stopped writer drops the reply: the receiver sees it.
        let _ = self.send(Op::Flush(reply));
        answer
    }

    /// Takes a record out of the index (in order with the writes queued before).
    pub(super) fn unindex(&self, record: &DeliveryRecord) {
        let _ = self.send(Op::Unindex(record.clone()));
    }

    /// Up to `limit` deliveries of a webhook's backlog after sequence number `after`, in order.
    pub(super) fn load(
        &self,
        webhook: &ObjectKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Delivery>)>, StoreError> {
        let txn = self.database.begin_read().map_err(db)?;
        let table = txn.open_table(BACKLOG).map_err(db)?;
        let name = webhook.to_string();
        let mut out = Vec::new();
        if after == u64::MAX {
            return Ok(out);
        }
        for entry in table
            .range((name.as_str(), after + 1)..=(name.as_str(), u64::MAX))
            .map_err(db)?
            .take(limit)
        {
            let (key, value) = entry.map_err(db)?;
            let seq = key.value().1;
            out.push((seq, Arc::new(decode(&name, value.value())?)));
        }
        Ok(out)
    }

    /// How many deliveries each webhook has in the backlog.
    pub(super) fn backlog(&self) -> Result<Vec<(ObjectKey, usize)>, StoreError> {
        let txn = self.database.begin_read().map_err(db)?;
        let table = txn.open_table(BACKLOG).map_err(db)?;
        let mut counts: Vec<(String, usize)> = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (key, _) = entry.map_err(db)?;
            let name = key.value().0;
            match counts.last_mut() {
                Some((last, count)) if last == name => *count += 1,
                _ => counts.push((name.to_string(), 1)),
            }
        }
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
        // The writer commits what it holds durably once its channel closes.
        drop(self.writer.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread's state.
struct Writer {
    database: Arc<redb::Database>,
    index: Arc<Mutex<Index>>,
    limits: RecordLimits,
    next_seq: u64,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Op>) {
        let mut ops = Vec::new();
        let mut dirty = false;
        while let Ok(op) = receiver.recv() {
            ops.push(op);
            while ops.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            dirty = self.commit(&mut ops, dirty);
        }
        if dirty {
            // The last finishes, made durable before the process goes.
            let (reply, _) = oneshot::channel();
            ops.push(Op::Flush(reply));
            self.commit(&mut ops, dirty);
        }
    }

    /// Writes a batch as one transaction and answers whoever waits for it. Returns whether
    /// non-durable writes remain.
    fn commit(&mut self, ops: &mut Vec<Op>, dirty: bool) -> bool {
        let durable = ops
            .iter()
            .any(|op| matches!(op, Op::Append { .. } | Op::Flush(_)));
        let mut seqs: Vec<Vec<u64>> = Vec::new();
        let result = self.write(ops, durable, &mut seqs);
        let mut seqs = seqs.into_iter();
        if let Err(e) = &result {
            tracing::error!("delivery store: a write failed: {e}");
        }
        for op in ops.drain(..) {
            match op {
                Op::Append {
                    reply, hand_over, ..
                } => {
                    let answer = match &result {
                        Ok(()) => {
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
                Op::Flush(reply) => {
                    let _ = reply.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(StoreError::Database(e.to_string())),
                    });
                }
                Op::Finish { .. } | Op::Unindex(_) => {}
            }
        }
        match result {
            Ok(()) => !durable,
            Err(_) => dirty,
        }
    }

    fn write(
        &mut self,
        ops: &[Op],
        durable: bool,
        seqs: &mut Vec<Vec<u64>>,
    ) -> Result<(), StoreError> {
        let mut txn = self.database.begin_write().map_err(db)?;
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(db)?;
        }
        let mut evicted = Vec::new();
        {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let mut backlog = txn.open_table(BACKLOG).map_err(db)?;
            let mut records = txn.open_table(RECORDS).map_err(db)?;
            let mut meta = txn.open_table(META).map_err(db)?;
            let first_seq = self.next_seq;
            let mut key = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let mut prune = Vec::new();
            let mut name = String::new();
            for op in ops {
                match op {
                    Op::Append { rows, .. } => {
                        let mut assigned = Vec::with_capacity(rows.len());
                        for (webhook, bytes) in rows {
                            let seq = self.next_seq;
                            self.next_seq += 1;
                            set_name(&mut name, webhook);
                            backlog
                                .insert((name.as_str(), seq), bytes.as_slice())
                                .map_err(db)?;
                            assigned.push(seq);
                        }
                        seqs.push(assigned);
                    }
                    Op::Finish { seq, record, bytes } => {
                        if let Some(seq) = seq {
                            set_name(&mut name, &record.webhook);
                            backlog.remove((name.as_str(), *seq)).map_err(db)?;
                        }
                        index.add(record);
                        prune.clear();
                        index.prune(record, &self.limits, |id| prune.push(id));
                        for id in &prune {
                            records.remove(id.encode(&mut key)).map_err(db)?;
                        }
                        records
                            .insert(record.id.encode(&mut key), bytes.as_slice())
                            .map_err(db)?;
                    }
                    Op::Unindex(record) => index.remove(record),
                    Op::Flush(_) => {}
                }
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
            if self.next_seq != first_seq {
                meta.insert(NEXT_SEQ, self.next_seq).map_err(db)?;
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
