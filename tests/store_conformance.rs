//! One conformance suite for the delivery store, run against every backend: in memory, on disk
//! (redb) and in PostgreSQL (a real server started on loopback). The same calls must give the
//! same answers, except where a backend is documented to differ: a memory store keeps no
//! backlog (its engine's queues hold it) and numbers nothing.

use std::sync::Arc;
use std::time::Duration;

use herald::object::ObjectKey;
use herald::outgoing::{Delivery, DeliveryId, ReportOutcome};
use herald::store::{
    DeliveryRecord, PostgresOptions, RecordFilter, RecordLimits, RetrySchedule, Store,
};
use herald_testkit::{postgres, sink};

fn key(name: &str) -> ObjectKey {
    name.parse().expect("key")
}

fn delivery(webhook: &str) -> Arc<Delivery> {
    Arc::new(Delivery::new(
        key(webhook),
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

fn limits() -> RecordLimits {
    RecordLimits {
        per_webhook: 2,
        dead_letters: 3,
        record_bodies: false,
        total: 100,
    }
}

/// A store of each kind, each with its own empty storage.
struct Backends {
    _dir: tempfile::TempDir,
    _postgres: postgres::Postgres,
    stores: Vec<(&'static str, Store)>,
}

async fn backends(limits: RecordLimits) -> Backends {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = postgres::Postgres::start();
    let stores = vec![
        ("memory", Store::memory(limits)),
        (
            "disk",
            Store::open(dir.path(), limits).expect("open the disk store"),
        ),
        (
            "postgres",
            Store::postgres(PostgresOptions::new(server.url()), limits)
                .await
                .expect("connect to PostgreSQL"),
        ),
    ];
    Backends {
        _dir: dir,
        _postgres: server,
        stores,
    }
}

/// Appending, claiming and finishing: the backlog in order, emptied by finishes; records
/// keep content for dead letters only.
async fn backlog_and_records(name: &str, store: &Store) {
    let a = delivery("ns/a");
    let b = delivery("ns/a");
    let other = delivery("ns/b");
    let seqs = store
        .append(&[a.clone(), other.clone(), b.clone()])
        .await
        .expect("append");
    assert_eq!(seqs.len(), 3, "{name}: one number per delivery");
    let pending = store.pending(&key("ns/a"), 0, 100).await.expect("pending");
    if store.is_durable() {
        assert!(seqs[0] < seqs[1] && seqs[1] < seqs[2], "{name}: in order");
        assert_eq!(
            pending,
            vec![(seqs[0], a.clone()), (seqs[2], b.clone())],
            "{name}: a webhook's backlog in order"
        );
        let after = store
            .pending(&key("ns/a"), seqs[0], 100)
            .await
            .expect("pending");
        assert_eq!(after, vec![(seqs[2], b.clone())], "{name}: after a cursor");
        let claimed = store.claim(&key("ns/a"), 0, 100).await.expect("claim");
        assert_eq!(
            claimed,
            vec![(seqs[0], a.clone()), (seqs[2], b.clone())],
            "{name}: claims the backlog in order"
        );
    } else {
        assert!(
            pending.is_empty(),
            "{name}: a memory store keeps no backlog"
        );
    }
    let seq = |i: usize| store.is_durable().then(|| seqs[i]);
    store
        .finish(seq(0), record(&a, ReportOutcome::Succeeded))
        .expect("finish");
    store
        .finish(seq(2), record(&b, ReportOutcome::Failed))
        .expect("finish");
    store.flush().await.expect("flush");
    assert!(
        store
            .pending(&key("ns/a"), 0, 100)
            .await
            .expect("pending")
            .is_empty(),
        "{name}: finished deliveries leave the backlog"
    );
    if store.is_durable() {
        assert_eq!(
            store.pending(&key("ns/b"), 0, 100).await.expect("pending"),
            vec![(seqs[1], other.clone())],
            "{name}: another webhook's backlog is untouched"
        );
    }
    let ok = store
        .record(&a.id.to_string())
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(ok.outcome, ReportOutcome::Succeeded, "{name}");
    assert_eq!(ok.delivery, None, "{name}: no content for successes");
    let dead = store
        .record(&b.id.to_string())
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(
        dead.delivery.as_deref(),
        Some(&*b),
        "{name}: dead letters keep their content"
    );
    assert_eq!(
        store.record("not-an-id").await.expect("read"),
        None,
        "{name}: whatever is not an id names no record"
    );
    let failed = store
        .records(&RecordFilter {
            outcome: Some(ReportOutcome::Failed),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        failed.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![b.id],
        "{name}: filtered by outcome"
    );
}

/// The ids of a webhook's records, newest first.
async fn record_ids(
    store: &Store,
    webhook: &str,
    outcome: Option<ReportOutcome>,
) -> Vec<DeliveryId> {
    let kept = store
        .records(&RecordFilter {
            webhook: Some(key(webhook)),
            outcome,
            limit: 0,
        })
        .await
        .expect("list");
    kept.iter().map(|r| r.id).collect()
}

/// The per-webhook limits keep the newest records of each class.
async fn per_webhook_limits(name: &str, store: &Store) {
    let mut ids = Vec::new();
    for _ in 0..5 {
        let d = delivery("ns/limited");
        store
            .finish(None, record(&d, ReportOutcome::Succeeded))
            .expect("finish");
        ids.push(d.id);
    }
    store.flush().await.expect("flush");
    let kept = record_ids(store, "ns/limited", Some(ReportOutcome::Succeeded)).await;
    assert_eq!(
        kept,
        vec![ids[4], ids[3]],
        "{name}: the two newest, newest first"
    );
    // Records kept before are pruned by the newer ones, written apart.
    let newer = delivery("ns/limited");
    store
        .finish(None, record(&newer, ReportOutcome::Succeeded))
        .expect("finish");
    store.flush().await.expect("flush");
    let kept = record_ids(store, "ns/limited", None).await;
    assert_eq!(
        kept,
        vec![newer.id, ids[4]],
        "{name}: the oldest one pruned"
    );
    for id in [ids[0], ids[3]] {
        assert!(
            store.record(&id.to_string()).await.expect("read").is_none(),
            "{name}: a pruned record is gone"
        );
    }
}

/// A replay finishes with the id of the record it replays: one record remains, with the new
/// outcome.
async fn replay_replaces(name: &str, store: &Store) {
    let d = delivery("ns/replayed");
    let newer = delivery("ns/replayed");
    store
        .finish(None, record(&d, ReportOutcome::Failed))
        .expect("finish");
    store
        .finish(None, record(&newer, ReportOutcome::Succeeded))
        .expect("finish");
    store.flush().await.expect("flush");
    let old = store
        .record(&d.id.to_string())
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(old.outcome, ReportOutcome::Failed, "{name}");
    // As the engine does: the replay goes through the backlog again.
    let seqs = store
        .append(std::slice::from_ref(&d))
        .await
        .expect("append");
    if store.is_durable() {
        let claimed = store
            .claim(&key("ns/replayed"), 0, 10)
            .await
            .expect("claim");
        assert_eq!(claimed, vec![(seqs[0], d.clone())], "{name}");
    }
    store
        .finish(
            store.is_durable().then(|| seqs[0]),
            record(&d, ReportOutcome::Succeeded),
        )
        .expect("finish again");
    store.flush().await.expect("flush");
    let all = store
        .records(&RecordFilter {
            webhook: Some(key("ns/replayed")),
            ..RecordFilter::default()
        })
        .await
        .expect("list");
    let ids: Vec<_> = all.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![newer.id, d.id], "{name}: one record per id");
    assert_eq!(all[1].outcome, ReportOutcome::Succeeded, "{name}");
}

/// The total cap drops the oldest records whatever their webhook.
async fn total_cap(name: &str, store: &Store) {
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
    store.flush().await.expect("flush");
    let all = store
        .records(&RecordFilter {
            limit: 0,
            ..RecordFilter::default()
        })
        .await
        .expect("list");
    let newest: Vec<_> = finished.iter().rev().take(100).copied().collect();
    let kept: Vec<_> = all.iter().map(|r| r.id).collect();
    assert_eq!(kept, newest, "{name}: the newest 100 records are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_keeps_the_backlog_and_records_alike() {
    let backends = backends(limits()).await;
    for (name, store) in &backends.stores {
        backlog_and_records(name, store).await;
        per_webhook_limits(name, store).await;
        replay_replaces(name, store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_caps_records_in_total() {
    let backends = backends(RecordLimits {
        per_webhook: 100,
        dead_letters: 100,
        record_bodies: false,
        total: 100,
    })
    .await;
    for (name, store) in &backends.stores {
        total_cap(name, store).await;
    }
}

fn quick(url: String) -> PostgresOptions {
    PostgresOptions {
        lease: Duration::from_secs(2),
        poll_interval: Duration::from_millis(200),
        ..PostgresOptions::new(url)
    }
}

/// One store on a server, as one replica.
async fn one_replica(server: &postgres::Postgres) -> Store {
    Store::postgres(quick(server.url()), limits())
        .await
        .expect("connect to PostgreSQL")
}

/// The schema versions applied, in order.
fn migrations(server: &postgres::Postgres) -> String {
    server.psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM herald_migrations")
}

/// Two stores on one server, as two replicas.
async fn two_replicas(server: &postgres::Postgres) -> (Store, Store) {
    (one_replica(server).await, one_replica(server).await)
}

/// A delivery of `ns/a` stored and claimed by `store`, with its row id.
async fn one_claimed(store: &Store) -> (Arc<Delivery>, u64) {
    let d = delivery("ns/a");
    let seq = store
        .append(std::slice::from_ref(&d))
        .await
        .expect("append")[0];
    assert_eq!(
        store.claim(&key("ns/a"), 0, 10).await.expect("claim").len(),
        1
    );
    (d, seq)
}

/// As if the replica holding the claims were paused past its lease.
fn expire_leases(server: &postgres::Postgres) {
    server.psql(
        "UPDATE herald_backlog SET lease_until = now() - interval '1 second'; \
         UPDATE herald_webhook_leases SET lease_until = now() - interval '1 second'",
    );
}

/// Two replicas on one database: a webhook's rows go to one replica at a time (its lease);
/// a replica that holds the webhook claims the rows the other stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_claim_a_webhook_one_at_a_time() {
    let server = postgres::Postgres::start();
    let (first, second) = two_replicas(&server).await;
    let a = delivery("ns/a");
    let b = delivery("ns/b");
    let seqs = first.append(&[a.clone(), b.clone()]).await.expect("append");
    let claimed = first.claim(&key("ns/a"), 0, 10).await.expect("claim");
    assert_eq!(claimed, vec![(seqs[0], a.clone())]);
    let more = delivery("ns/a");
    let more_seq = second
        .append(std::slice::from_ref(&more))
        .await
        .expect("append")[0];
    assert!(
        second
            .claim(&key("ns/a"), 0, 10)
            .await
            .expect("claim")
            .is_empty(),
        "the first replica holds ns/a: the second claims none of it"
    );
    assert_eq!(
        second.claim(&key("ns/b"), 0, 10).await.expect("claim"),
        vec![(seqs[1], b.clone())],
        "another webhook is free for the second replica"
    );
    // The first finishes its row and finds the one the second stored.
    first
        .finish(Some(seqs[0]), record(&a, ReportOutcome::Succeeded))
        .expect("finish");
    first.flush().await.expect("flush");
    assert_eq!(
        first.claim(&key("ns/a"), 0, 10).await.expect("claim"),
        vec![(more_seq, more.clone())]
    );
    let waiting = second.waiting().await.expect("waiting");
    assert!(
        waiting.contains(&(key("ns/a"), 1, 0)),
        "one row of ns/a, held: {waiting:?}"
    );
}

/// A replica that stops renewing (its leases run out) loses its claims: another takes them,
/// and the first one's late finish is refused by the claim check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_finish_after_a_takeover_is_refused() {
    let server = postgres::Postgres::start();
    let (first, second) = two_replicas(&server).await;
    let (d, seq) = one_claimed(&first).await;
    // As if the first replica were paused past its lease.
    expire_leases(&server);
    assert_eq!(
        second.claim(&key("ns/a"), 0, 10).await.expect("claim"),
        vec![(seq, d.clone())],
        "an expired claim returns to the queue"
    );
    first
        .finish(Some(seq), record(&d, ReportOutcome::Failed))
        .expect("queue the late finish");
    first.flush().await.expect("flush");
    assert_eq!(
        second.pending(&key("ns/a"), 0, 10).await.expect("pending"),
        vec![(seq, d.clone())],
        "the late finish did not remove the row"
    );
    assert_eq!(
        second.record(&d.id.to_string()).await.expect("read"),
        None,
        "nor record it"
    );
    second
        .finish(Some(seq), record(&d, ReportOutcome::Succeeded))
        .expect("finish");
    second.flush().await.expect("flush");
    assert!(
        second
            .pending(&key("ns/a"), 0, 10)
            .await
            .expect("pending")
            .is_empty()
    );
    assert_eq!(
        second
            .record(&d.id.to_string())
            .await
            .expect("read")
            .map(|r| r.outcome),
        Some(ReportOutcome::Succeeded)
    );
}

/// A retry schedule written by the replica holding a delivery goes with the delivery: the
/// replica that takes it over finds it, once; the first replica, its claim lost, writes no
/// more of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_schedule_goes_with_a_delivery_taken_over() {
    let server = postgres::Postgres::start();
    let (first, second) = two_replicas(&server).await;
    let (d, seq) = one_claimed(&first).await;
    let at = |secs| std::time::UNIX_EPOCH + Duration::from_secs(secs);
    let schedule = RetrySchedule {
        attempts: 3,
        first_attempt: at(1_800_000_000),
        next_attempt: at(1_800_000_060),
    };
    first.retrying(seq, schedule);
    first.flush().await.expect("flush");
    assert_eq!(
        first.resumed(seq),
        None,
        "nothing to resume where it was tried"
    );
    expire_leases(&server);
    assert_eq!(
        second.claim(&key("ns/a"), 0, 10).await.expect("claim"),
        vec![(seq, d.clone())]
    );
    assert_eq!(second.resumed(seq), Some(schedule));
    assert_eq!(second.resumed(seq), None, "taken once");
    first.retrying(
        seq,
        RetrySchedule {
            attempts: 4,
            ..schedule
        },
    );
    first.flush().await.expect("flush");
    assert_eq!(
        server.psql("SELECT attempts FROM herald_backlog"),
        "3",
        "a replica that lost the claim does not write the schedule"
    );
}

/// Replicas starting together on an empty database: the migrations run once, under the
/// advisory lock, and every replica comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrating_an_empty_database_at_once_all_come_up() {
    let server = postgres::Postgres::start();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = server.url();
            tokio::spawn(async move { Store::postgres(quick(url), limits()).await })
        })
        .collect();
    for start in starts {
        start.await.expect("task").expect("the replica came up");
    }
    assert_eq!(migrations(&server), "1,2,3,4", "each version applied once");
}

/// A database one version behind (before the tables' vacuum settings) is brought up to date
/// at start, keeping its backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_one_version_behind_is_migrated_keeping_its_backlog() {
    let server = postgres::Postgres::start();
    let store = one_replica(&server).await;
    store.append(&[delivery("ns/a")]).await.expect("append");
    drop(store);
    // As version 2 left it.
    server.psql(
        "DELETE FROM herald_migrations WHERE version = 3; \
         ALTER TABLE herald_backlog RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, \
             autovacuum_vacuum_cost_delay, autovacuum_analyze_scale_factor, autovacuum_analyze_threshold); \
         ALTER TABLE herald_records RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, \
             autovacuum_vacuum_cost_delay)",
    );
    let settings = "SELECT coalesce(array_to_string(reloptions, ','), '') FROM pg_class \
                    WHERE relname = 'herald_backlog'";
    assert_eq!(server.psql(settings), "");
    let store = one_replica(&server).await;
    assert_eq!(migrations(&server), "1,2,3,4");
    let options = server.psql(settings);
    assert!(
        options.contains("autovacuum_vacuum_scale_factor=0")
            && options.contains("autovacuum_vacuum_cost_delay=0"),
        "the backlog is vacuumed after a fixed number of dead rows, unthrottled: {options}"
    );
    assert_eq!(
        store.claim(&key("ns/a"), 0, 10).await.expect("claim").len(),
        1,
        "the delivery stored before the migration is still there"
    );
}

/// A database at version 3 (before the index of unclaimed rows) gains the index at start, and
/// its backlog is claimed through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_at_version_3_gains_the_index_of_unclaimed_rows() {
    let server = postgres::Postgres::start();
    let store = one_replica(&server).await;
    let d = delivery("ns/a");
    let seq = store
        .append(std::slice::from_ref(&d))
        .await
        .expect("append")[0];
    drop(store);
    // As version 3 left it.
    server.psql(
        "DELETE FROM herald_migrations WHERE version = 4; DROP INDEX herald_backlog_unclaimed",
    );
    let index = "SELECT indexdef FROM pg_indexes WHERE indexname = 'herald_backlog_unclaimed'";
    assert_eq!(server.psql(index), "");
    let store = one_replica(&server).await;
    assert_eq!(migrations(&server), "1,2,3,4");
    assert!(
        server.psql(index).contains("WHERE (claim_id IS NULL)"),
        "{}",
        server.psql(index)
    );
    assert_eq!(
        store.claim(&key("ns/a"), 0, 10).await.expect("claim"),
        vec![(seq, d)],
        "the delivery stored before the migration is claimed"
    );
}

/// Without a flush, the background upkeep applies the per-webhook limits to the webhooks it
/// recorded for, and vacuums the tables once many rows were deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_pruned_and_the_tables_vacuumed_in_the_background() {
    let server = postgres::Postgres::start();
    let store = one_replica(&server).await;
    // More finishes than the upkeep lets pass before it vacuums (10,000).
    for _ in 0..12_000 {
        store
            .finish(None, record(&delivery("ns/busy"), ReportOutcome::Succeeded))
            .expect("finish");
    }
    let count = "SELECT count(*) FROM herald_records WHERE webhook = 'ns/busy'";
    let vacuums = "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'herald_backlog'";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (server.psql(count) != "2" || server.psql(vacuums) == "0")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        server.psql(count),
        "2",
        "the webhook's records are pruned to its limit without a flush"
    );
    assert_ne!(
        server.psql(vacuums),
        "0",
        "the backlog was vacuumed by Herald (vacuum_count counts a client's VACUUMs, not autovacuum's)"
    );
}

/// TLS to the database with a CA of its own: trusted through `ca_pem`, refused without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified_against_the_given_ca() {
    let pki = sink::TestPki::generate();
    let server = postgres::Postgres::start_tls(&pki.server_cert_pem, &pki.server_key_pem);
    let url = format!(
        "postgres://herald@localhost:{}/postgres?sslmode=require",
        server.port()
    );
    let refused = Store::postgres(
        PostgresOptions {
            write_timeout: Duration::from_secs(3),
            ..PostgresOptions::new(url.clone())
        },
        limits(),
    )
    .await;
    let error = refused.expect_err("an unknown CA is refused").to_string();
    assert!(error.contains("PostgreSQL"), "{error}");
    let store = Store::postgres(
        PostgresOptions {
            ca_pem: pki.ca_pem.clone().into_bytes(),
            ..quick(url)
        },
        limits(),
    )
    .await
    .expect("connect with the CA");
    let d = delivery("ns/a");
    store
        .append(std::slice::from_ref(&d))
        .await
        .expect("append over TLS");
    let encrypted = server.psql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE s.ssl AND a.application_name <> 'psql'",
    );
    assert_ne!(encrypted, "0", "Herald's connections use TLS");
}
