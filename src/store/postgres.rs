//! The PostgreSQL store: one queue shared by every replica.
//!
//! Accepted deliveries are rows of `herald_backlog`; a batch of requests is written by one
//! writer task in one transaction (group commit) and each request is answered once the
//! transaction holding it has committed. Work is claimed without a transaction held across the
//! HTTP call: a short `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)
//! RETURNING` sets a claim id and a lease expiry, the lease is renewed while the replica holds
//! the row, and a finish deletes the row only where the claim id still matches (a replica that
//! lost its lease, paused or cut off, cannot finish what another replica took over). Expired
//! leases return to the queue.
//!
//! Per-webhook isolation across replicas: before claiming a webhook's rows a replica takes the
//! webhook's lease in `herald_webhook_leases` (one owner at a time, renewed with the row
//! leases, taken over once expired, given back when the owner finds nothing more to claim). A
//! webhook's worker sends one delivery at a time, so a webhook gets at most one request in
//! flight across all replicas, exactly as from one replica, and its backlog keeps its order.
//! One dead webhook holds only its own lease: the others are claimed by whichever replica
//! takes them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::{
    DeliveryRecord, HandOver, RecordClass, RecordFilter, RecordLimits, RetrySchedule, StoreError,
    decode, encode, writer_stopped, written,
};
use crate::object::ObjectKey;
use crate::outgoing::Delivery;

/// How a PostgreSQL store connects and how long its leases last.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// The connection string (`postgres://...` or `key=value` form). May hold a password:
    /// never logged.
    pub url: String,
    /// Extra CA certificates (PEM) trusted for TLS to the database, on top of the public roots.
    /// TLS itself follows the URL's `sslmode` (`prefer` when unset).
    pub ca_pem: Vec<u8>,
    /// Connections in this replica's pool.
    pub pool_size: usize,
    /// How long a claim lasts without renewal: a replica that stops renewing (killed, paused,
    /// cut off) loses its claims this long after its last renewal.
    pub lease: Duration,
    /// How often idle workers look for claimable work when no notification came.
    pub poll_interval: Duration,
    /// Longest time a write may take before the requests waiting for it are refused (503).
    pub write_timeout: Duration,
}

impl PostgresOptions {
    /// Options with the defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            ca_pem: Vec::new(),
            pool_size: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// The channel notified, with the webhook as payload, when deliveries are committed.
const CHANNEL: &str = "herald_backlog";
/// The advisory lock key held while migrating ("herald" in ASCII).
const MIGRATION_LOCK: i64 = 0x6865_7261_6c64;
/// Most operations taken into one transaction.
const MAX_BATCH: usize = 4096;
/// Transactions a replica writes at once (each on a connection of its own).
const WRITERS: usize = 2;
/// Rows deleted (deliveries finished, records pruned) after which a replica vacuums the tables.
const VACUUM_AFTER_ROWS: u64 = 10_000;
/// How often a replica applies the record limits to the webhooks it recorded for.
const PRUNE_EVERY: Duration = Duration::from_secs(2);

/// The schema, one entry per version, applied in order and each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE herald_backlog (
    id bigserial PRIMARY KEY,
    webhook text COLLATE "C" NOT NULL,
    body bytea NOT NULL,
    claim_id bigint,
    lease_until timestamptz,
    accepted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX herald_backlog_by_webhook ON herald_backlog (webhook, id);
CREATE TABLE herald_webhook_leases (
    webhook text COLLATE "C" PRIMARY KEY,
    owner bigint NOT NULL,
    lease_until timestamptz NOT NULL
);
CREATE TABLE herald_records (
    id text COLLATE "C" PRIMARY KEY,
    webhook text COLLATE "C" NOT NULL,
    class smallint NOT NULL,
    outcome text NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX herald_records_by_webhook ON herald_records (webhook, class, id);
"#,
    ),
    (
        2,
        r#"
ALTER TABLE herald_backlog
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN first_attempt_at timestamptz,
    ADD COLUMN retry_at timestamptz;
"#,
    ),
    (
        3,
        // Both tables churn (every row is deleted soon after it is written): autovacuum's
        // defaults (a fifth of the table dead, throttled) would let them grow far past what
        // they hold. Herald vacuums them itself too (see `upkeep`); these cover a Herald that
        // may not.
        r#"
ALTER TABLE herald_backlog SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 10000);
ALTER TABLE herald_records SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0);
"#,
    ),
    (
        4,
        // The rows nobody holds, for claims: a claim walking the webhook's whole backlog
        // passed over every row its holder already had (thousands when it falls behind) on
        // each claim. Rows written claimed by the webhook's holder never enter it.
        r#"
CREATE INDEX herald_backlog_unclaimed ON herald_backlog (webhook, id) WHERE claim_id IS NULL;
"#,
    ),
];

fn pg<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Database(format!("PostgreSQL: {e}"))
}

fn pg_error(e: &tokio_postgres::Error) -> StoreError {
    // The server's message says what failed; the Display of the error alone often does not.
    match e.as_db_error() {
        Some(db) => StoreError::Database(format!("PostgreSQL: {}", db.message())),
        None => pg(e),
    }
}

/// One piece of work for the writer.
enum Op {
    /// Accepted deliveries, answered with their row ids once committed (after `hand_over`
    /// was called with them). A row whose `claimed` is set is written already claimed by this
    /// replica (it holds the webhook's lease), so that its worker needs no claim query.
    Append {
        rows: Vec<(String, Vec<u8>)>,
        claimed: Vec<bool>,
        hand_over: Option<HandOver>,
        reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    },
    /// A finished delivery: its row deleted where the claim still matches, then recorded.
    Finish(Finished),
    /// A retry scheduled: written into the row where the claim still matches.
    Retry(Retrying),
    /// Answers once everything before it is written.
    Flush(oneshot::Sender<Result<(), StoreError>>),
}

struct Finished {
    /// Its backlog row and the claim it was finished under (`None`: never claimed).
    row: Option<(i64, Option<i64>)>,
    id: String,
    webhook: String,
    class: i16,
    outcome: &'static str,
    body: Vec<u8>,
}

/// A delivery's retry schedule, for its row under the claim it was tried with.
struct Retrying {
    row: i64,
    claim: i64,
    schedule: RetrySchedule,
}

/// The claims this replica holds: row id to claim id.
type Held = Mutex<HashMap<i64, i64>>;

/// What this replica's writes leave for the upkeep: the webhooks and record classes it recorded
/// for since the last pruning, and the rows it deleted since the last vacuum.
#[derive(Default)]
struct Churn {
    recorded: Mutex<HashSet<(String, i16)>>,
    deleted: std::sync::atomic::AtomicU64,
}

/// The webhooks whose lease this replica holds: their new rows are written already claimed.
type Owned = Mutex<HashMap<String, OwnedWebhook>>;

/// A webhook whose lease this replica holds.
#[derive(Clone, Copy)]
struct OwnedWebhook {
    /// Until when it surely holds it: half a lease after the last successful take or renewal.
    until: Instant,
    /// When it last wrote or claimed one of its rows: a webhook idle for a lease is given back
    /// (by the renewal), so that any replica may take it.
    used: Instant,
    /// When a claim last looked for its rows whose lease ran out.
    expired_looked_at: Instant,
}

/// The PostgreSQL store.
pub(super) struct PostgresStore {
    pool: Pool,
    options: PostgresOptions,
    /// This replica's owner id in the webhook leases.
    owner: i64,
    held: Arc<Held>,
    owned: Arc<Owned>,
    /// Webhooks another replica held when this one last tried to take them, and until when
    /// they are not tried again.
    elsewhere: Arc<Mutex<HashMap<String, Instant>>>,
    /// The retry schedules found in rows this replica claimed, until their worker takes them.
    resumed: Mutex<HashMap<i64, RetrySchedule>>,
    /// Webhooks named by notifications since the engine last asked (see
    /// [`PostgresStore::take_notified`]).
    notified: Arc<Mutex<HashSet<String>>>,
    writer: mpsc::UnboundedSender<Op>,
    healthy: Arc<AtomicBool>,
    /// Notified when another replica (or this one) commits deliveries.
    wakeup: Arc<Notify>,
    limits: RecordLimits,
    churn: Arc<Churn>,
    stop: CancellationToken,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The retry schedule in a claimed row (`attempts, first_attempt_at, retry_at` after `id,
/// body`), when a replica tried the delivery before.
fn stored_schedule(row: &tokio_postgres::Row) -> Option<RetrySchedule> {
    let attempts: i32 = row.get(2);
    let first_attempt: Option<std::time::SystemTime> = row.get(3);
    let next_attempt: Option<std::time::SystemTime> = row.get(4);
    Some(RetrySchedule {
        attempts: u32::try_from(attempts).ok().filter(|a| *a > 0)?,
        first_attempt: first_attempt?,
        next_attempt: next_attempt?,
    })
}

impl PostgresStore {
    /// Connects, migrates the schema (under an advisory lock, so replicas starting together
    /// are safe) and starts the writer, the lease renewal, the listener and the pruning.
    pub(super) async fn connect(
        options: PostgresOptions,
        limits: RecordLimits,
    ) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|e| StoreError::Database(format!("the database URL is not valid: {e}")))?;
        let tls = crate::tls::client_config_trusting(&options.ca_pem)
            .map_err(|e| StoreError::Database(format!("TLS to the database: {e}")))?;
        let tls = MakeRustlsConnect::new(tls);
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .wait_timeout(Some(options.write_timeout))
            .create_timeout(Some(options.write_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(pg)?;
        {
            let mut client = pool.get().await.map_err(pg)?;
            migrate(&mut client).await?;
        }
        let (writer, ops) = mpsc::unbounded_channel();
        let store = PostgresStore {
            pool: pool.clone(),
            owner: rand::random::<i64>(),
            held: Arc::default(),
            owned: Arc::default(),
            elsewhere: Arc::default(),
            resumed: Mutex::default(),
            notified: Arc::default(),
            writer,
            healthy: Arc::new(AtomicBool::new(true)),
            wakeup: Arc::new(Notify::new()),
            limits,
            churn: Arc::default(),
            stop: CancellationToken::new(),
            options,
        };
        // Two writers when the pool has room (one otherwise): while one transaction waits for
        // its commit to be flushed to disk, the next gathers and runs; the server flushes both
        // commits at once.
        let writers = if store.options.pool_size >= 4 {
            WRITERS
        } else {
            1
        };
        let ops = Arc::new(tokio::sync::Mutex::new(ops));
        let in_flight = Arc::new(tokio::sync::RwLock::new(()));
        for _ in 0..writers {
            tokio::spawn(
                Writer {
                    pool: pool.clone(),
                    healthy: store.healthy.clone(),
                    timeout: store.options.write_timeout,
                    held: store.held.clone(),
                    claim: rand::random::<i64>(),
                    lease: store.options.lease,
                    carried: Vec::new(),
                    client: None,
                    churn: store.churn.clone(),
                    in_flight: in_flight.clone(),
                }
                .run(ops.clone(), store.stop.clone()),
            );
        }
        tokio::spawn(renew_leases(
            pool.clone(),
            store.held.clone(),
            store.owned.clone(),
            store.owner,
            store.options.lease,
            store.stop.clone(),
        ));
        tokio::spawn(listen(
            config,
            tls,
            store.wakeup.clone(),
            store.notified.clone(),
            store.stop.clone(),
        ));
        tokio::spawn(check_health(
            pool.clone(),
            store.healthy.clone(),
            store.options.write_timeout,
            store.stop.clone(),
        ));
        tokio::spawn(upkeep(
            pool,
            limits,
            store.churn.clone(),
            store.stop.clone(),
        ));
        Ok(store)
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        self.writer.send(op).map_err(|_| writer_stopped())
    }

    /// Whether the database answered the last write and health check.
    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Notified when deliveries were committed by any replica.
    pub(super) fn wakeup(&self) -> &Arc<Notify> {
        &self.wakeup
    }

    /// How often idle workers look for work when no notification came.
    pub(super) fn poll_interval(&self) -> Duration {
        self.options.poll_interval
    }

    /// The webhooks named by notifications since the last call.
    pub(super) fn take_notified(&self) -> Vec<ObjectKey> {
        let names = std::mem::take(&mut *self.notified.lock().unwrap_or_else(|e| e.into_inner()));
        names.iter().filter_map(|name| name.parse().ok()).collect()
    }

    /// Stores accepted deliveries in the next shared transaction; their row ids once committed.
    /// The rows of webhooks whose lease this replica holds are written claimed by it and handed
    /// to `hand_over` as held.
    pub(super) async fn append(
        &self,
        deliveries: &[Arc<Delivery>],
        hand_over: Option<HandOver>,
    ) -> Result<Vec<u64>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = deliveries
            .iter()
            .map(|d| (d.webhook.to_string(), encode(d)))
            .collect();
        let claimed = match &hand_over {
            Some(_) => {
                let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                rows.iter()
                    .map(|(webhook, _)| match owned.get_mut(webhook) {
                        Some(held) if held.until > now => {
                            held.used = now;
                            true
                        }
                        _ => false,
                    })
                    .collect()
            }
            None => vec![false; rows.len()],
        };
        let (reply, answer) = oneshot::channel();
        self.send(Op::Append {
            rows,
            claimed,
            hand_over,
            reply,
        })?;
        written(answer).await
    }

    /// Claims up to `limit` of a webhook's rows that nobody holds (or whose lease expired), in
    /// order, once this replica holds the webhook's lease. None when another replica holds it.
    ///
    /// The lease is taken with a statement only when this replica does not surely hold it
    /// already (see [`OwnedWebhook::until`]); a webhook found held by another replica is not
    /// asked for again for a while ([`PostgresStore::held_elsewhere`]): every replica is woken
    /// by every replica's new rows, and only the holder has anything to do.
    pub(super) async fn claim(
        &self,
        webhook: &ObjectKey,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Delivery>)>, StoreError> {
        let name = webhook.to_string();
        let started = Instant::now();
        let (holding, expired_looked_at) = self
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .map_or((false, None), |held| {
                (held.until > started, Some(held.expired_looked_at))
            });
        // Rows whose lease ran out (their replica stopped, or a write of unknown outcome left
        // them claimed by nobody) are looked for when the webhook is taken and then once per
        // poll interval.
        let look_for_expired = !holding
            || expired_looked_at
                .is_none_or(|at| started.duration_since(at) >= self.options.poll_interval);
        if !holding && self.held_elsewhere(&name, started) {
            return Ok(Vec::new());
        }
        let lease = seconds(self.options.lease);
        let client = self.pool.get().await.map_err(pg)?;
        let take_rows = client.prepare_cached(TAKE_ROWS);
        let take_rows = if holding {
            // Surely this replica's still: no statement for the lease.
            take_rows.await.map_err(|e| pg_error(&e))?
        } else {
            let (take_lease, take_rows) =
                futures::try_join!(client.prepare_cached(TAKE_LEASE), take_rows)
                    .map_err(|e| pg_error(&e))?;
            let owned = client
                .query_opt(&take_lease, &[&name, &self.owner, &lease])
                .await
                .map_err(|e| pg_error(&e))?;
            if owned.is_none() {
                self.disown(&name);
                self.elsewhere
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name, started + self.options.poll_interval / 2);
                return Ok(Vec::new());
            }
            take_rows
        };
        let claim = rand::random::<i64>();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // A claim's commit does not wait for the disk: a claim lost with the server's crash
        // leaves its rows unclaimed, to be claimed and sent again (as after a lost lease);
        // the finish, which does wait, flushes the claim with it. Sent at once (one round
        // trip); a failed claim is rolled back by the COMMIT after it.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&name, &claim, &lease, &limit, &look_for_expired];
        let (began, rows, committed) = futures::join!(
            client.batch_execute("BEGIN; SET LOCAL synchronous_commit = off"),
            client.query(&take_rows, &params),
            client.batch_execute("COMMIT"),
        );
        began.map_err(|e| pg_error(&e))?;
        let rows = rows.map_err(|e| pg_error(&e))?;
        committed.map_err(|e| pg_error(&e))?;
        {
            // Held until half a lease after it was taken; kept after a claim that found
            // nothing (given back once idle for a lease, see `renew_leases`), so that a
            // wakeup for rows this worker already holds does not give the webhook away.
            let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
            let until = started + self.options.lease / 2;
            let entry = owned.entry(name.clone()).or_insert(OwnedWebhook {
                until,
                used: started,
                expired_looked_at: started,
            });
            if look_for_expired {
                entry.expired_looked_at = started;
            }
            if !holding {
                // Taken (or renewed) by this claim's statement.
                entry.until = entry.until.max(until);
            }
            if !rows.is_empty() {
                entry.used = started;
            }
        }
        let mut found = Vec::with_capacity(rows.len());
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let mut resumed = self.resumed.lock().unwrap_or_else(|e| e.into_inner());
            for row in &rows {
                let id: i64 = row.get(0);
                held.insert(id, claim);
                if let Some(schedule) = stored_schedule(row) {
                    resumed.insert(id, schedule);
                }
            }
        }
        for row in rows {
            let id: i64 = row.get(0);
            let body: &[u8] = row.get(1);
            let delivery: Delivery = decode(&name, body)?;
            found.push((u64::try_from(id).unwrap_or_default(), Arc::new(delivery)));
        }
        found.sort_unstable_by_key(|(id, _)| *id);
        Ok(found)
    }

    /// Stops renewing the claim on one row (see [`super::Store::let_go`]).
    pub(super) fn let_go(&self, seq: u64) {
        if let Ok(id) = i64::try_from(seq) {
            self.held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            self.resumed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }

    /// Queues a delivery's retry schedule for its row, under this replica's claim.
    pub(super) fn retrying(&self, seq: u64, schedule: RetrySchedule) {
        let Ok(row) = i64::try_from(seq) else { return };
        let claim = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&row)
            .copied();
        if let Some(claim) = claim {
            // A stopped writer loses only the schedule: the delivery itself stays in its row.
            let _ = self.send(Op::Retry(Retrying {
                row,
                claim,
                schedule,
            }));
        }
    }

    /// The retry schedule found in a row this replica claimed, taken once.
    pub(super) fn resumed(&self, seq: u64) -> Option<RetrySchedule> {
        let row = i64::try_from(seq).ok()?;
        self.resumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row)
    }

    /// Whether a webhook was found held by another replica a moment ago (then it is not asked
    /// for again until the entry runs out).
    fn held_elsewhere(&self, webhook: &str, now: Instant) -> bool {
        let mut elsewhere = self.elsewhere.lock().unwrap_or_else(|e| e.into_inner());
        match elsewhere.get(webhook) {
            Some(until) if *until > now => true,
            Some(_) => {
                elsewhere.remove(webhook);
                false
            }
            None => false,
        }
    }

    /// Forgets that this replica holds a webhook's lease: its new rows are written unclaimed.
    fn disown(&self, webhook: &str) {
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(webhook);
    }

    /// Queues a finished delivery for the next transaction: its row goes only if this replica
    /// still holds its claim.
    pub(super) fn finish(
        &self,
        seq: Option<u64>,
        record: DeliveryRecord,
    ) -> Result<(), StoreError> {
        let row = seq.and_then(|s| i64::try_from(s).ok()).map(|id| {
            self.resumed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            let claim = self
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            (id, claim)
        });
        self.send(Op::Finish(Finished {
            row,
            id: record.id.to_string(),
            webhook: record.webhook.to_string(),
            class: i16::from(RecordClass::of(&record) == RecordClass::DeadLetter),
            outcome: record.outcome.as_str(),
            body: encode(&record),
        }))
    }

    /// Writes everything queued so far, then applies the record limits.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Flush(reply))?;
        written(answer).await?;
        let client = self.pool.get().await.map_err(pg)?;
        prune(&client, &self.limits).await
    }

    /// Gives back every claim and webhook lease this replica holds (at shutdown), so other
    /// replicas take them over at once instead of after the lease.
    pub(super) async fn release_claims(&self) -> Result<(), StoreError> {
        let claims: Vec<i64> = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let claims = held
                .values()
                .copied()
                .collect::<std::collections::BTreeSet<_>>();
            held.clear();
            claims.into_iter().collect()
        };
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let client = self.pool.get().await.map_err(pg)?;
        client
            .execute(
                "UPDATE herald_backlog SET claim_id = NULL, lease_until = NULL WHERE claim_id = ANY($1)",
                &[&claims],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        client
            .execute(
                "DELETE FROM herald_webhook_leases WHERE owner = $1",
                &[&self.owner],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        Ok(())
    }

    /// Each webhook's backlog: `(webhook, rows, rows claimable now)`.
    pub(super) async fn waiting(&self) -> Result<Vec<(ObjectKey, usize, usize)>, StoreError> {
        let client = self.pool.get().await.map_err(pg)?;
        let rows = client
            .query(
                "SELECT webhook, count(*), count(*) FILTER (WHERE claim_id IS NULL OR lease_until < now()) \
                 FROM herald_backlog GROUP BY webhook",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let name: &str = row.get(0);
            let total: i64 = row.get(1);
            let claimable: i64 = row.get(2);
            let key = name.parse::<ObjectKey>().map_err(|e| StoreError::Corrupt {
                key: name.to_string(),
                message: e.to_string(),
            })?;
            out.push((
                key,
                usize::try_from(total).unwrap_or_default(),
                usize::try_from(claimable).unwrap_or_default(),
            ));
        }
        Ok(out)
    }

    /// How often to look for webhooks no replica has: twice per lease (once a minute with the
    /// default lease of 30 s), so that their rows go soon after the grace of ten leases.
    pub(super) fn orphan_sweep_every(&self) -> Duration {
        self.options.lease * 2
    }

    /// Webhooks whose rows nobody has claimed for ten leases while no replica held the
    /// webhook's lease: no replica has the webhook (it was deleted everywhere), since one that
    /// has it claims its rows within a poll.
    pub(super) async fn orphaned(&self) -> Result<Vec<ObjectKey>, StoreError> {
        let grace = seconds(self.options.lease * 10);
        let client = self.pool.get().await.map_err(pg)?;
        let rows = client
            .query(
                "SELECT DISTINCT b.webhook FROM herald_backlog b \
                 WHERE b.accepted_at < now() - make_interval(secs => $1::float8) \
                 AND (b.claim_id IS NULL OR b.lease_until < now() - make_interval(secs => $1::float8)) \
                 AND NOT EXISTS (SELECT 1 FROM herald_webhook_leases l WHERE l.webhook = b.webhook \
                     AND l.lease_until > now() - make_interval(secs => $1::float8))",
                &[&grace],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        Ok(rows
            .iter()
            .filter_map(|row| row.get::<_, &str>(0).parse().ok())
            .collect())
    }

    /// Every row of a webhook's backlog after `after`, claimed or not (for tests and tools).
    pub(super) async fn peek(
        &self,
        webhook: &ObjectKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Delivery>)>, StoreError> {
        let name = webhook.to_string();
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.pool.get().await.map_err(pg)?;
        let rows = client
            .query(
                "SELECT id, body FROM herald_backlog WHERE webhook = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[&name, &after, &limit],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.get(0);
                let body: &[u8] = row.get(1);
                Ok((
                    u64::try_from(id).unwrap_or_default(),
                    Arc::new(decode::<Delivery>(&name, body)?),
                ))
            })
            .collect()
    }

    /// One record by id.
    pub(super) async fn record(&self, id: &str) -> Result<Option<DeliveryRecord>, StoreError> {
        let client = self.pool.get().await.map_err(pg)?;
        let row = client
            .query_opt("SELECT body FROM herald_records WHERE id = $1", &[&id])
            .await
            .map_err(|e| pg_error(&e))?;
        row.map(|row| decode(id, row.get::<_, &[u8]>(0)))
            .transpose()
    }

    /// Records matching a filter, newest first.
    pub(super) async fn records(
        &self,
        filter: &RecordFilter,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let webhook = filter.webhook.as_ref().map(ToString::to_string);
        let outcome = filter.outcome.map(|o| o.as_str());
        let limit = if filter.limit == 0 {
            i64::MAX
        } else {
            i64::try_from(filter.limit).unwrap_or(i64::MAX)
        };
        let client = self.pool.get().await.map_err(pg)?;
        let rows = client
            .query(
                "SELECT id, body FROM herald_records \
                 WHERE ($1::text IS NULL OR webhook = $1) AND ($2::text IS NULL OR outcome = $2) \
                 ORDER BY id DESC LIMIT $3",
                &[&webhook, &outcome, &limit],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        rows.iter()
            .map(|row| decode(row.get::<_, &str>(0), row.get::<_, &[u8]>(1)))
            .collect()
    }
}

/// Applies the migrations this database lacks, one transaction each, under an advisory lock.
async fn migrate(client: &mut deadpool_postgres::Client) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg_error(&e))?;
    let result = apply_migrations(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked.map_err(|e| pg_error(&e))?;
    Ok(())
}

async fn apply_migrations(client: &mut deadpool_postgres::Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS herald_migrations (\
                 version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(|e| pg_error(&e))?;
    let applied: Vec<i32> = client
        .query("SELECT version FROM herald_migrations", &[])
        .await
        .map_err(|e| pg_error(&e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if let Some(newer) = applied.iter().find(|v| **v > known) {
        return Err(StoreError::Database(format!(
            "the database schema is at version {newer}, newer than this Herald knows ({known}); run a newer Herald"
        )));
    }
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let txn = client.transaction().await.map_err(|e| pg_error(&e))?;
        txn.batch_execute(sql).await.map_err(|e| pg_error(&e))?;
        txn.execute(
            "INSERT INTO herald_migrations (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(|e| pg_error(&e))?;
        txn.commit().await.map_err(|e| pg_error(&e))?;
        tracing::info!(version, "database schema migrated");
    }
    Ok(())
}

/// The writer task's state.
struct Writer {
    pool: Pool,
    healthy: Arc<AtomicBool>,
    timeout: Duration,
    /// The claims of this replica, which rows written claimed join.
    held: Arc<Held>,
    /// The claim id of every row this replica writes claimed (one id, so that renewing its
    /// leases names few ids).
    claim: i64,
    lease: Duration,
    /// Finishes whose write failed, tried again with the next batch.
    carried: Vec<Finished>,
    /// The writer's own connection, kept between transactions (so that group commits never
    /// wait for a connection behind claims), given up when a write fails.
    client: Option<deadpool_postgres::Client>,
    /// Where committed finishes are counted for the upkeep.
    churn: Arc<Churn>,
    /// Held (read) by each transaction being written, from when its operations were taken;
    /// a flush is answered once it can be held alone (write), when every transaction taken
    /// before it is written.
    in_flight: Arc<tokio::sync::RwLock<()>>,
}

/// Where a request's row ids (or the failure) go.
type AppendReply = oneshot::Sender<Result<Vec<u64>, StoreError>>;

/// The appends of one transaction, in the order their requests came.
#[derive(Default)]
struct Appends {
    rows: Vec<(String, Vec<u8>)>,
    claimed: Vec<bool>,
    /// Per request: its number of rows, what to hand them to, and whom to answer.
    requests: Vec<(usize, Option<HandOver>, AppendReply)>,
}

impl Writer {
    /// Takes the operations waiting (while another writer's transaction runs, the next one
    /// gathers here) and writes them, until the store stops.
    async fn run(
        mut self,
        ops: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Op>>>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::new();
        loop {
            let writing = {
                let mut ops = ops.lock().await;
                let first = tokio::select! {
                    op = ops.recv() => op,
                    () = stop.cancelled() => None,
                };
                let Some(first) = first else { break };
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match ops.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                // Taken before the next writer may take operations: a flush among those
                // waits for this transaction.
                self.in_flight.clone().read_owned().await
            };
            self.commit(&mut batch, writing).await;
        }
    }

    /// Writes a batch in one transaction and answers whoever waits for it.
    async fn commit(
        &mut self,
        batch: &mut Vec<Op>,
        writing: tokio::sync::OwnedRwLockReadGuard<()>,
    ) {
        let mut appends = Appends::default();
        let mut flushes = Vec::new();
        let mut retries = Vec::new();
        let mut finishes = std::mem::take(&mut self.carried);
        for op in batch.drain(..) {
            match op {
                Op::Append {
                    rows,
                    claimed,
                    hand_over,
                    reply,
                } => {
                    appends.requests.push((rows.len(), hand_over, reply));
                    appends.rows.extend(rows);
                    appends.claimed.extend(claimed);
                }
                Op::Finish(finished) => finishes.push(finished),
                Op::Flush(reply) => flushes.push(reply),
                Op::Retry(retrying) => retries.push(retrying),
            }
        }
        let claim = self.claim;
        let claims: Vec<Option<i64>> = appends
            .claimed
            .iter()
            .map(|claimed| claimed.then_some(claim))
            .collect();
        let written = async {
            let client = match &mut self.client {
                Some(client) => client,
                client => client.insert(self.pool.get().await.map_err(pg)?),
            };
            let batch = Batch {
                appends: &appends.rows,
                claims: &claims,
                lease: self.lease,
                finishes: &finishes,
                retries: &retries,
            };
            write(client, &batch).await
        };
        let result = tokio::time::timeout(self.timeout, written)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Database(format!(
                    "PostgreSQL did not commit within {:?}",
                    self.timeout
                )))
            });
        if result.is_err() {
            // Whether that transaction committed is not known. Its connection is closed, not
            // returned to the pool (where a half-answered session would serve the next claim).
            // Rows it may have written claimed are held by no worker: new rows take a new
            // claim id, so the old one leaves the renewal once the rows held under it are
            // finished, and those rows' lease runs out and they are claimed again.
            if let Some(client) = self.client.take() {
                drop(deadpool_postgres::Client::take(client));
            }
            self.claim = rand::random::<i64>();
        }
        self.healthy.store(result.is_ok(), Ordering::Release);
        match result {
            Ok(ids) => {
                {
                    let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                    for (id, claim) in ids.iter().zip(&claims) {
                        if let (Some(claim), Ok(id)) = (claim, i64::try_from(*id)) {
                            held.insert(id, *claim);
                        }
                    }
                }
                let mut ids = ids.into_iter();
                let mut claimed = appends.claimed.into_iter();
                for (count, hand_over, reply) in appends.requests {
                    let ids: Vec<u64> = ids.by_ref().take(count).collect();
                    let claimed: Vec<bool> = claimed.by_ref().take(count).collect();
                    if let Some(hand_over) = hand_over {
                        hand_over(&ids, &claimed);
                    }
                    let _ = reply.send(Ok(ids));
                }
                if !flushes.is_empty() {
                    // Answered once the transactions taken before this one are written too.
                    drop(writing);
                    let _alone = self.in_flight.write().await;
                    for reply in flushes {
                        let _ = reply.send(Ok(()));
                    }
                }
                self.churn.deleted.fetch_add(
                    u64::try_from(finishes.len() + retries.len()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                if !finishes.is_empty() {
                    let mut recorded = self
                        .churn
                        .recorded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    for finished in &finishes {
                        recorded.insert((finished.webhook.clone(), finished.class));
                    }
                }
            }
            Err(e) => {
                tracing::error!("delivery store: a write failed: {e}");
                for (_, _, reply) in appends.requests {
                    let _ = reply.send(Err(StoreError::Database(e.to_string())));
                }
                for reply in flushes {
                    let _ = reply.send(Err(StoreError::Database(e.to_string())));
                }
                // Finishes are tried again (until then their rows stay, and are sent again
                // only if their lease runs out first: never lost).
                self.carried = finishes;
                self.carried.truncate(MAX_BATCH);
            }
        }
    }
}

/// What one transaction writes.
struct Batch<'a> {
    /// Accepted deliveries: webhook and body.
    appends: &'a [(String, Vec<u8>)],
    /// Per append, the claim it is written under (`None`: unclaimed).
    claims: &'a [Option<i64>],
    lease: Duration,
    finishes: &'a [Finished],
    retries: &'a [Retrying],
}

/// One transaction: the appends (their row ids returned in order; a row with a claim written
/// claimed by it, with a lease), one notification per webhook with new unclaimed rows, the
/// finishes (rows deleted where the claim matches and, in the same statement, records written
/// for those and for deliveries without a row) and the retry schedules. Statements are
/// prepared once per connection; `BEGIN`, the statements and `COMMIT` are then sent at once
/// (pipelined on the connection), so a transaction costs one round trip. Should a statement
/// fail, the transaction is aborted and the `COMMIT` after it ends it without writing anything,
/// and the batch fails as a whole. Every commit waits for the WAL flush, finishes alone too:
/// while it waits the next batch gathers (committing finishes without the wait made many small
/// transactions, more work per delivery).
async fn write(
    client: &mut deadpool_postgres::Client,
    batch: &Batch<'_>,
) -> Result<Vec<u64>, StoreError> {
    let statements = WriterStatements::prepare(client).await?;
    let client: &deadpool_postgres::Client = client;
    // Each future sends its request when first polled, and `join!` polls them in this order:
    // the requests go out in order before any answer is awaited.
    let (began, ids, deleted, retried, committed) = futures::join!(
        client.batch_execute("BEGIN"),
        insert_rows(
            client,
            &statements,
            batch.appends,
            batch.claims,
            batch.lease
        ),
        finish_rows(client, &statements, batch.finishes),
        update_retries(client, &statements, batch.retries),
        client.batch_execute("COMMIT"),
    );
    began.map_err(|e| pg_error(&e))?;
    let ids = ids?;
    let deleted = deleted?;
    retried?;
    committed.map_err(|e| pg_error(&e))?;
    warn_refused(batch.finishes, &deleted);
    Ok(ids)
}

/// The writer's statements, prepared once per pooled connection.
struct WriterStatements {
    insert: tokio_postgres::Statement,
    notify: tokio_postgres::Statement,
    finish: tokio_postgres::Statement,
    retry: tokio_postgres::Statement,
}

impl WriterStatements {
    /// The statements, prepared on this connection unless they were already.
    async fn prepare(client: &deadpool_postgres::Client) -> Result<Self, StoreError> {
        let (insert, notify, finish, retry) = futures::try_join!(
            client.prepare_cached(INSERT_ROWS),
            client.prepare_cached(NOTIFY_WEBHOOKS),
            client.prepare_cached(FINISH_ROWS),
            client.prepare_cached(UPDATE_RETRIES),
        )
        .map_err(|e| pg_error(&e))?;
        Ok(WriterStatements {
            insert,
            notify,
            finish,
            retry,
        })
    }
}

/// Takes a webhook's lease for an owner: written when it is free, expired or the owner's own;
/// a lease another replica holds and that has not run out is neither written nor locked (a
/// locking upsert made the replicas queue on the lease row behind one another).
const TAKE_LEASE: &str = "INSERT INTO herald_webhook_leases (webhook, owner, lease_until) \
     SELECT $1, $2, now() + make_interval(secs => $3::float8) \
     WHERE NOT EXISTS (SELECT 1 FROM herald_webhook_leases \
         WHERE webhook = $1 AND owner <> $2 AND lease_until >= now()) \
     ON CONFLICT (webhook) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until \
     WHERE herald_webhook_leases.owner = excluded.owner OR herald_webhook_leases.lease_until < now() \
     RETURNING owner";

/// Claims up to `$4` of a webhook's rows nobody holds, in order, found through the index of
/// unclaimed rows; with `$5`, also those whose lease ran out (found by walking the webhook's
/// whole backlog, so only now and then).
const TAKE_ROWS: &str = "WITH free AS MATERIALIZED (SELECT id FROM herald_backlog \
         WHERE webhook = $1 AND claim_id IS NULL ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED), \
     expired AS MATERIALIZED (SELECT id FROM herald_backlog \
         WHERE $5 AND webhook = $1 AND lease_until < now() ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED) \
     UPDATE herald_backlog SET claim_id = $2, lease_until = now() + make_interval(secs => $3::float8) \
     WHERE id IN (SELECT id FROM (SELECT id FROM free UNION ALL SELECT id FROM expired) AS f ORDER BY id LIMIT $4) \
     RETURNING id, body, attempts, first_attempt_at, retry_at";

/// Inserts accepted deliveries; their ids come from the sequence in the order of the rows:
/// PostgreSQL evaluates a volatile function of the select list after its ORDER BY, so the n-th
/// smallest id returned is the n-th row's.
const INSERT_ROWS: &str = "INSERT INTO herald_backlog (id, webhook, body, claim_id, lease_until) \
     SELECT nextval('herald_backlog_id_seq'), f.webhook, f.body, f.claim, \
         CASE WHEN f.claim IS NULL THEN NULL ELSE now() + make_interval(secs => $4::float8) END \
     FROM unnest($1::text[], $2::bytea[], $3::int8[]) WITH ORDINALITY AS f(webhook, body, claim, n) \
     ORDER BY f.n RETURNING id";

/// Notifies the replicas of webhooks with new unclaimed rows.
const NOTIFY_WEBHOOKS: &str = "SELECT pg_notify($1, w) FROM unnest($2::text[]) AS w";

/// Deletes finished rows where the claim still matches and records them (and deliveries that
/// had no row); the ids deleted.
const FINISH_ROWS: &str = "WITH gone AS (\
         DELETE FROM herald_backlog b USING unnest($1::bigint[], $2::bigint[]) AS f(id, claim) \
         WHERE b.id = f.id AND b.claim_id IS NOT DISTINCT FROM f.claim RETURNING b.id), \
     recorded AS (\
         INSERT INTO herald_records (id, webhook, class, outcome, body) \
         SELECT r.id, r.webhook, r.class, r.outcome, r.body \
         FROM unnest($3::text[], $4::text[], $5::int2[], $6::text[], $7::bytea[], $8::bigint[]) \
             AS r(id, webhook, class, outcome, body, row) \
         WHERE r.row IS NULL OR r.row IN (SELECT id FROM gone) \
         ON CONFLICT (id) DO UPDATE SET webhook = excluded.webhook, class = excluded.class, \
             outcome = excluded.outcome, body = excluded.body) \
     SELECT id FROM gone";

/// Writes retry schedules into their rows where the claim still matches.
const UPDATE_RETRIES: &str = "UPDATE herald_backlog b SET attempts = r.attempts, first_attempt_at = r.first, retry_at = r.next \
     FROM unnest($1::bigint[], $2::bigint[], $3::int4[], $4::timestamptz[], $5::timestamptz[]) \
         AS r(id, claim, attempts, first, next) \
     WHERE b.id = r.id AND b.claim_id = r.claim";

/// Inserts accepted deliveries (and notifies the webhooks of the unclaimed ones); their row ids
/// in order.
async fn insert_rows(
    client: &deadpool_postgres::Client,
    statements: &WriterStatements,
    appends: &[(String, Vec<u8>)],
    claims: &[Option<i64>],
    lease: Duration,
) -> Result<Vec<u64>, StoreError> {
    if appends.is_empty() {
        return Ok(Vec::new());
    }
    let webhooks: Vec<&str> = appends.iter().map(|(w, _)| w.as_str()).collect();
    let bodies: Vec<&[u8]> = appends.iter().map(|(_, b)| b.as_slice()).collect();
    let mut unclaimed: Vec<&str> = webhooks
        .iter()
        .zip(claims)
        .filter(|(_, claim)| claim.is_none())
        .map(|(webhook, _)| *webhook)
        .collect();
    unclaimed.sort_unstable();
    unclaimed.dedup();
    let lease = seconds(lease);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&webhooks, &bodies, &claims, &lease];
    let inserted = client.query(&statements.insert, &params);
    let notified = async {
        if unclaimed.is_empty() {
            return Ok(0);
        }
        client
            .execute(&statements.notify, &[&CHANNEL, &unclaimed])
            .await
    };
    let (rows, _) = futures::try_join!(inserted, notified).map_err(|e| pg_error(&e))?;
    let mut taken: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    taken.sort_unstable();
    Ok(taken
        .into_iter()
        .map(|id| u64::try_from(id).unwrap_or_default())
        .collect())
}

/// Deletes the rows of finished deliveries where this replica's claim still holds and, in the
/// same statement, records those and the deliveries that had no row (one record per id: a
/// replay finishing twice in a batch keeps the last); the ids deleted.
async fn finish_rows(
    client: &deadpool_postgres::Client,
    statements: &WriterStatements,
    finishes: &[Finished],
) -> Result<HashSet<i64>, StoreError> {
    if finishes.is_empty() {
        return Ok(HashSet::new());
    }
    let (rows, claims): (Vec<i64>, Vec<Option<i64>>) =
        finishes.iter().filter_map(|f| f.row).unzip();
    let mut records: BTreeMap<&str, &Finished> = BTreeMap::new();
    for finished in finishes {
        records.insert(finished.id.as_str(), finished);
    }
    let ids: Vec<&str> = records.keys().copied().collect();
    let webhooks: Vec<&str> = records.values().map(|f| f.webhook.as_str()).collect();
    let classes: Vec<i16> = records.values().map(|f| f.class).collect();
    let outcomes: Vec<&str> = records.values().map(|f| f.outcome).collect();
    let bodies: Vec<&[u8]> = records.values().map(|f| f.body.as_slice()).collect();
    let record_rows: Vec<Option<i64>> = records.values().map(|f| f.row.map(|(id, _)| id)).collect();
    let gone = client
        .query(
            &statements.finish,
            &[
                &rows,
                &claims,
                &ids,
                &webhooks,
                &classes,
                &outcomes,
                &bodies,
                &record_rows,
            ],
        )
        .await
        .map_err(|e| pg_error(&e))?;
    Ok(gone.iter().map(|r| r.get::<_, i64>(0)).collect())
}

/// Logs the finishes refused because this replica's claim on them was lost.
fn warn_refused(finishes: &[Finished], deleted: &HashSet<i64>) {
    for finished in finishes {
        if let Some((row, _)) = finished.row
            && !deleted.contains(&row)
        {
            tracing::warn!(
                delivery = %finished.id, webhook = %finished.webhook,
                "finish refused: this replica's claim on the delivery was lost (its lease ran out and another replica took it over)"
            );
        }
    }
}

/// Writes scheduled retries into their rows where the claim still matches.
async fn update_retries(
    client: &deadpool_postgres::Client,
    statements: &WriterStatements,
    retries: &[Retrying],
) -> Result<(), StoreError> {
    if retries.is_empty() {
        return Ok(());
    }
    let rows: Vec<i64> = retries.iter().map(|r| r.row).collect();
    let claims: Vec<i64> = retries.iter().map(|r| r.claim).collect();
    let attempts: Vec<i32> = retries
        .iter()
        .map(|r| i32::try_from(r.schedule.attempts).unwrap_or(i32::MAX))
        .collect();
    let first: Vec<std::time::SystemTime> =
        retries.iter().map(|r| r.schedule.first_attempt).collect();
    let next: Vec<std::time::SystemTime> =
        retries.iter().map(|r| r.schedule.next_attempt).collect();
    client
        .execute(
            &statements.retry,
            &[&rows, &claims, &attempts, &first, &next],
        )
        .await
        .map_err(|e| pg_error(&e))?;
    Ok(())
}

/// Renews the leases of every claim this replica holds, and of its webhooks, a few times per
/// lease; gives back the leases of webhooks it has not used for a lease.
async fn renew_leases(
    pool: Pool,
    held: Arc<Held>,
    owned: Arc<Owned>,
    owner: i64,
    lease: Duration,
    stop: CancellationToken,
) {
    let every = lease / 3;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let claims: Vec<i64> = {
            let held = held.lock().unwrap_or_else(|e| e.into_inner());
            let mut claims: Vec<i64> = held.values().copied().collect();
            claims.sort_unstable();
            claims.dedup();
            claims
        };
        let idle: Vec<String> = {
            let mut owned = owned.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let idle: Vec<String> = owned
                .iter()
                .filter(|(_, w)| now.duration_since(w.used) > lease)
                .map(|(name, _)| name.clone())
                .collect();
            for name in &idle {
                owned.remove(name);
            }
            idle
        };
        let started = Instant::now();
        let renewed = async {
            let client = pool.get().await.map_err(pg)?;
            let secs = seconds(lease);
            if !idle.is_empty() {
                client
                    .execute(
                        "DELETE FROM herald_webhook_leases WHERE owner = $1 AND webhook = ANY($2)",
                        &[&owner, &idle],
                    )
                    .await
                    .map_err(|e| pg_error(&e))?;
            }
            let renewed: HashSet<String> = client
                .query(
                    "UPDATE herald_webhook_leases SET lease_until = now() + make_interval(secs => $2::float8) \
                     WHERE owner = $1 RETURNING webhook",
                    &[&owner, &secs],
                )
                .await
                .map_err(|e| pg_error(&e))?
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect();
            if !claims.is_empty() {
                client
                    .execute(
                        "UPDATE herald_backlog SET lease_until = now() + make_interval(secs => $2::float8) WHERE claim_id = ANY($1)",
                        &[&claims, &secs],
                    )
                    .await
                    .map_err(|e| pg_error(&e))?;
            }
            Ok::<_, StoreError>(renewed)
        };
        match tokio::time::timeout(every, renewed)
            .await
            .unwrap_or_else(|_| Err(StoreError::Database("lease renewal timed out".into())))
        {
            Ok(renewed) => {
                // Only the webhooks whose lease is still this replica's stay held (a lease
                // given back while a claim took it again is taken again by the next claim).
                let until = started + lease / 2;
                owned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|name, webhook| {
                        if renewed.contains(name) {
                            webhook.until = webhook.until.max(until);
                            true
                        } else {
                            // Not this replica's in the table: kept only if a claim took it
                            // after the renewal started.
                            webhook.until > until
                        }
                    });
            }
            Err(e) => tracing::warn!("cannot renew delivery leases: {e}"),
        }
    }
}

/// Listens for committed deliveries on a connection of its own (reconnecting when it drops)
/// and wakes the idle workers.
async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    wakeup: Arc<Notify>,
    notified: Arc<Mutex<HashSet<String>>>,
    stop: CancellationToken,
) {
    use futures::StreamExt as _;
    loop {
        let connected = config.connect(tls.clone()).await;
        match connected {
            Ok((client, mut connection)) => {
                let (messages, mut received) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut stream =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = stream.next().await {
                        match message {
                            Ok(message) => {
                                if messages.send(message).is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!("cannot listen for new deliveries: {}", pg_error(&e));
                } else {
                    // Whatever was committed while not listening is found by the next look.
                    wakeup.notify_one();
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => { driver.abort(); return; }
                            message = received.recv() => match message {
                                Some(tokio_postgres::AsyncMessage::Notification(note)) => {
                                    let first = {
                                        let mut names = notified
                                            .lock()
                                            .unwrap_or_else(|e| e.into_inner());
                                        let first = names.is_empty();
                                        names.insert(note.payload().to_string());
                                        first
                                    };
                                    // Names added to a set not taken yet ride on the wakeup
                                    // already sent for it: a wakeup for a set taken already
                                    // would find no names, which means "look at every
                                    // webhook" (a count of the whole backlog).
                                    if first {
                                        wakeup.notify_one();
                                    }
                                }
                                Some(_) => {}
                                None => break,
                            },
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::debug!(
                "cannot connect to listen for new deliveries: {}",
                pg_error(&e)
            ),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Checks the database every second, so that readiness follows it even when nothing is
/// written.
async fn check_health(
    pool: Pool,
    healthy: Arc<AtomicBool>,
    timeout: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let check = async {
            let client = pool.get().await.map_err(pg)?;
            client
                .batch_execute("SELECT 1")
                .await
                .map_err(|e| pg_error(&e))
        };
        let ok = matches!(tokio::time::timeout(timeout, check).await, Ok(Ok(())));
        if healthy.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                tracing::info!("the database answers again");
            } else {
                tracing::error!("the database does not answer: refusing new alerts until it does");
            }
        }
    }
}

/// Keeps the tables small: every [`PRUNE_EVERY`] applies the record limits to the webhooks this
/// replica recorded for, and once this replica has deleted [`VACUUM_AFTER_ROWS`] rows vacuums
/// both tables. Every finished delivery leaves a dead row in the backlog and, once pruned, in
/// the records; autovacuum visits a database about once a minute, in which time a busy queue
/// leaves hundreds of thousands of dead rows, the tables grow past the server's buffers, and
/// every write and scan slows down with them.
async fn upkeep(pool: Pool, limits: RecordLimits, churn: Arc<Churn>, stop: CancellationToken) {
    let mut vacuum_refused = false;
    let mut pruned_at = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if pruned_at.elapsed() >= PRUNE_EVERY {
            pruned_at = Instant::now();
            let recorded =
                std::mem::take(&mut *churn.recorded.lock().unwrap_or_else(|e| e.into_inner()));
            let pruned = async {
                let client = pool.get().await.map_err(pg)?;
                prune_recorded(&client, &limits, &recorded).await
            };
            match pruned.await {
                Ok(deleted) => {
                    churn.deleted.fetch_add(deleted, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!("cannot prune delivery records: {e}");
                    // Pruned with the next ones.
                    churn
                        .recorded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(recorded);
                }
            }
        }
        if vacuum_refused || churn.deleted.load(Ordering::Relaxed) < VACUUM_AFTER_ROWS {
            continue;
        }
        churn.deleted.store(0, Ordering::Relaxed);
        let vacuumed = async {
            let client = pool.get().await.map_err(pg)?;
            // SKIP_LOCKED: another replica's vacuum is as good; no truncation, which would
            // lock the table against every write while it looks for empty pages at its end.
            client
                .batch_execute(
                    "VACUUM (SKIP_LOCKED, TRUNCATE false) herald_backlog, herald_records",
                )
                .await
                .map_err(|e| pg_error(&e))
        };
        if let Err(e) = vacuumed.await {
            // Most likely not the tables' owner: autovacuum alone keeps them then.
            tracing::warn!(
                "cannot vacuum the delivery tables (left to autovacuum from now on): {e}"
            );
            vacuum_refused = true;
        }
    }
}

/// Drops the records of the given webhooks and classes past their per-webhook limit (those
/// older than the newest `limit`, found through the `(webhook, class, id)` index), then the
/// oldest past the total; the number of records deleted.
async fn prune_recorded(
    client: &deadpool_postgres::Client,
    limits: &RecordLimits,
    recorded: &HashSet<(String, i16)>,
) -> Result<u64, StoreError> {
    let (webhooks, classes): (Vec<&str>, Vec<i16>) =
        recorded.iter().map(|(w, c)| (w.as_str(), *c)).unzip();
    let kept = i64::try_from(limits.per_webhook).unwrap_or(i64::MAX);
    let dead = i64::try_from(limits.dead_letters).unwrap_or(i64::MAX);
    if kept == 0 || dead == 0 {
        // Nothing kept of a class: every record of it goes, which the full pruning does.
        prune(client, limits).await?;
        return Ok(0);
    }
    let mut deleted = 0;
    if !webhooks.is_empty() {
        // The oldest record kept of each webhook and class first (materialized, so that it is
        // looked up once per webhook, not once per record), then a range of the index each.
        let statement = client
            .prepare_cached(
                "WITH k AS MATERIALIZED (\
                     SELECT u.webhook, u.class, (SELECT x.id FROM herald_records x \
                         WHERE x.webhook = u.webhook AND x.class = u.class ORDER BY x.id DESC \
                         OFFSET (CASE WHEN u.class = 1 THEN $4::bigint ELSE $3::bigint END) - 1 \
                         LIMIT 1) AS oldest_kept \
                     FROM unnest($1::text[], $2::int2[]) AS u(webhook, class)) \
                 DELETE FROM herald_records r USING k \
                 WHERE r.webhook = k.webhook AND r.class = k.class AND r.id < k.oldest_kept",
            )
            .await
            .map_err(|e| pg_error(&e))?;
        deleted += client
            .execute(&statement, &[&webhooks, &classes, &kept, &dead])
            .await
            .map_err(|e| pg_error(&e))?;
    }
    Ok(deleted + prune_total(client, limits).await?)
}

/// Drops the records past the per-webhook limits of every webhook, then past the total,
/// oldest first.
async fn prune(
    client: &deadpool_postgres::Client,
    limits: &RecordLimits,
) -> Result<(), StoreError> {
    let kept = i64::try_from(limits.per_webhook).unwrap_or(i64::MAX);
    let dead = i64::try_from(limits.dead_letters).unwrap_or(i64::MAX);
    client
        .execute(
            "DELETE FROM herald_records r USING (\
                 SELECT id, class, row_number() OVER (PARTITION BY webhook, class ORDER BY id DESC) AS n \
                 FROM herald_records) x \
             WHERE r.id = x.id AND x.n > CASE WHEN x.class = 1 THEN $2::bigint ELSE $1::bigint END",
            &[&kept, &dead],
        )
        .await
        .map_err(|e| pg_error(&e))?;
    prune_total(client, limits).await?;
    Ok(())
}

/// Drops the oldest records past the total limit; how many.
async fn prune_total(
    client: &deadpool_postgres::Client,
    limits: &RecordLimits,
) -> Result<u64, StoreError> {
    let total = i64::try_from(limits.total.max(1)).unwrap_or(i64::MAX);
    client
        .execute(
            "DELETE FROM herald_records WHERE id < \
             (SELECT id FROM herald_records ORDER BY id DESC OFFSET $1::bigint - 1 LIMIT 1)",
            &[&total],
        )
        .await
        .map_err(|e| pg_error(&e))
}
