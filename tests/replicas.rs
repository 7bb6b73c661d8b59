//! Replicas sharing one queue in PostgreSQL, as real processes on loopback: `herald run` with
//! `--database-url` against a real server started by the test (testkit/src/postgres.rs).
//! Three replicas behind an endpoint that fails for a while, one killed with SIGKILL
//! mid-flood (every delivery answered 200 arrives; duplicates, by Idempotency-Key, are
//! counted); a replica paused with SIGSTOP past its lease (another takes its claims, and its
//! late finishes are refused); the database stopped during a flood (503s while it is down,
//! nothing accepted lost, recovery without restarting Herald); replicas starting together on an
//! empty database; the deliveries of a webhook no replica has any more dropped and recorded
//! after the grace; a replica taking over a delivery that was being retried continues its
//! retry schedule (attempt count, dead-letter limit). Figures are printed with `eprintln!`; no test asserts a time.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use cli::Running;
use flood::{CountingSink, WEBHOOKS, payload, write_config};
use herald_testkit::{cli, flood, postgres};
use postgres::Postgres;
use serde_json::Value;

/// Posts one alert; its status (0 when the request failed).
async fn post(client: &reqwest::Client, url: &str, seq: usize) -> u16 {
    match client.post(url).json(&payload(seq)).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            if status == 503 {
                assert!(
                    r.headers().get("retry-after").is_some(),
                    "a 503 without Retry-After"
                );
            }
            status
        }
        Err(_) => 0,
    }
}

/// `herald run` on the database at `url`, with a lease of 2 s and retries for as long as a
/// test lasts, unless `extra` sets them.
async fn start_replica(config: &Path, url: &str, extra: &[&str]) -> Running {
    let mut args = vec!["--database-url", url];
    for (flag, value) in [
        ("--database-lease", "2s"),
        ("--retry-max-attempts", "100000"),
        ("--retry-max-elapsed", "10m"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    Running::start(config, &args).await
}

/// The records a replica's admin API lists for `query` (e.g. `limit=0&outcome=Dropped`).
async fn listed(client: &reqwest::Client, replica: &Running, query: &str) -> Vec<Value> {
    let listed: Value = client
        .get(format!("{}/api/v1/deliveries?{query}", replica.admin_url()))
        .send()
        .await
        .expect("list deliveries")
        .json()
        .await
        .expect("json");
    listed["deliveries"].as_array().expect("deliveries").clone()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_killed_mid_flood_lose_nothing_answered_200() {
    const POSTS: usize = 900;
    let server = Postgres::start();
    let sink = CountingSink::start(0, Duration::ZERO).await;
    sink.set_failing(true);
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let url = server.url();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Some(start_replica(config.path(), &url, &[]).await));
    }
    let targets: Vec<String> = replicas
        .iter()
        .flatten()
        .map(|r| r.url("/api/v1/alerts"))
        .collect();
    let client = client();
    let mut accepted = BTreeSet::new();
    let mut refused = 0;
    let started = Instant::now();
    for chunk in (0..POSTS).collect::<Vec<_>>().chunks(30) {
        if chunk[0] == POSTS / 3 {
            // Mid-flood, with claims held and attempts failing: SIGKILL, no shutdown code.
            if let Some(victim) = replicas[0].take() {
                victim.kill9();
            }
        }
        if chunk[0] == 2 * POSTS / 3 {
            sink.set_failing(false);
        }
        let answers = futures::future::join_all(chunk.iter().map(|&seq| {
            let client = client.clone();
            // After the kill only the live replicas are posted to.
            let live = if replicas[0].is_some() { 0 } else { 1 };
            let target = targets[live + seq % (3 - live)].clone();
            async move { (seq, post(&client, &target, seq).await) }
        }))
        .await;
        for (seq, status) in answers {
            match status {
                200 => {
                    accepted.insert(seq);
                }
                503 => refused += 1,
                other => panic!("post {seq}: status {other}"),
            }
        }
    }
    sink.set_failing(false);
    sink.wait_for_all(&accepted, Duration::from_secs(120)).await;
    let lost = accepted.difference(&sink.seqs()).count();
    eprintln!(
        "three replicas, one killed: {POSTS} posts, {} answered 200, {refused} answered 503; \
         all arrived after {:.1?}; lost {lost}; duplicates (same Idempotency-Key) {}",
        accepted.len(),
        started.elapsed(),
        sink.duplicates()
    );
    assert_eq!(lost, 0);
    assert!(
        accepted.len() > POSTS / 2,
        "most posts were accepted: {}",
        accepted.len()
    );
    // The shared backlog empties once everything is delivered.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.psql("SELECT count(*) FROM herald_backlog") != "0" {
        assert!(Instant::now() < deadline, "the backlog never emptied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_loses_its_claims_and_its_late_finish_is_refused() {
    const POSTS: usize = 6;
    let server = Postgres::start();
    let sink = CountingSink::start(0, Duration::ZERO).await;
    // Slow enough that the first replica still holds claims when it is paused.
    sink.set_delay(Duration::from_millis(500));
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let url = server.url();
    let first = start_replica(config.path(), &url, &[]).await;
    let client = client();
    for seq in 0..POSTS {
        // All for webhook w0: one worker, in order.
        assert_eq!(
            post(&client, &first.url("/api/v1/alerts"), seq * WEBHOOKS).await,
            200
        );
    }
    // Paused while it holds claims on deliveries it has not finished.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server
        .psql("SELECT count(*) FROM herald_backlog WHERE claim_id IS NOT NULL")
        .parse::<usize>()
        .expect("a count")
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the first replica claimed nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal("STOP");
    let second = start_replica(config.path(), &url, &[]).await;
    let expected: BTreeSet<usize> = (0..POSTS).map(|s| s * WEBHOOKS).collect();
    sink.wait_for_all(&expected, Duration::from_secs(60)).await;
    second.wait_log("delivered", Duration::from_secs(10)).await;
    first.signal("CONT");
    first
        .wait_log("finish refused", Duration::from_secs(30))
        .await;
    // One record per delivery, each written by the replica that held the claim.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let records = server.psql("SELECT count(*) FROM herald_records");
        let backlog = server.psql("SELECT count(*) FROM herald_backlog");
        if records == POSTS.to_string() && backlog == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "records {records}, backlog {backlog}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Either replica answers for both from the shared tables.
    for replica in [&first, &second] {
        let listed = listed(&client, replica, "limit=0").await;
        assert_eq!(listed.len(), POSTS, "{listed:?}");
        assert!(
            listed.iter().all(|r| r["outcome"] == "Succeeded"),
            "{listed:?}"
        );
    }
    eprintln!(
        "paused replica: {POSTS} deliveries, duplicates (same Idempotency-Key) {}",
        sink.duplicates()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_down_during_a_flood_means_503s_and_nothing_accepted_is_lost() {
    let server = Postgres::start();
    let sink = CountingSink::start(0, Duration::ZERO).await;
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let replica = start_replica(config.path(), &server.url(), &[]).await;
    let target = replica.url("/api/v1/alerts");
    let client = client();
    let mut accepted = BTreeSet::new();
    let mut refused_while_down = 0;
    let mut seq = 0;
    let mut post_some = async |n: usize, accepted: &mut BTreeSet<usize>| {
        let mut refused = 0;
        for _ in 0..n {
            match post(&client, &target, seq).await {
                200 => {
                    accepted.insert(seq);
                }
                503 => refused += 1,
                other => panic!("post {seq}: status {other}"),
            }
            seq += 1;
        }
        refused
    };
    post_some(200, &mut accepted).await;
    server.stop();
    let down = Instant::now();
    let mut not_ready = false;
    while down.elapsed() < Duration::from_secs(4) {
        refused_while_down += post_some(10, &mut accepted).await;
        let ready = client
            .get(replica.url("/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        not_ready |= ready == 503;
    }
    server.restart();
    // Recovery without restarting Herald: posts are accepted again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = accepted.len();
        post_some(10, &mut accepted).await;
        if accepted.len() == before + 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Herald did not accept again after the database came back:\n{}",
            replica.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    post_some(200, &mut accepted).await;
    sink.wait_for_all(&accepted, Duration::from_secs(60)).await;
    eprintln!(
        "database down: {seq} posts, {} answered 200, {refused_while_down} answered 503 while it was down; lost 0; duplicates {}",
        accepted.len(),
        sink.duplicates()
    );
    assert!(refused_while_down > 0, "no 503 while the database was down");
    assert!(
        not_ready,
        "/readyz never failed while the database was down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_at_once_on_an_empty_database_both_come_up() {
    let server = Postgres::start();
    let sink = CountingSink::start(0, Duration::ZERO).await;
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let url = server.url();
    let (first, second) = tokio::join!(
        start_replica(config.path(), &url, &[]),
        start_replica(config.path(), &url, &[])
    );
    // Each version applied once, by one of them (versions 1 and 2).
    assert_eq!(
        server
            .psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM herald_migrations"),
        "1,2,3,4"
    );
    let client = client();
    assert_eq!(post(&client, &first.url("/api/v1/alerts"), 1).await, 200);
    assert_eq!(post(&client, &second.url("/api/v1/alerts"), 2).await, 200);
    sink.wait_for_all(&BTreeSet::from([1, 2]), Duration::from_secs(30))
        .await;
}

/// Waits (bounded) until `sql` answers `expected`.
async fn wait_for_sql(server: &Postgres, sql: &str, expected: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = server.psql(sql);
        if answer == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {answer}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_a_webhook_no_replica_has_are_dropped_and_recorded_after_the_grace() {
    // Webhook w9 exists only in the first replica's configuration; w0 in both.
    const GONE: usize = 9;
    const POSTS: usize = 4;
    let server = Postgres::start();
    let sink = CountingSink::start(0, Duration::ZERO).await;
    sink.set_failing(true);
    let all = tempfile::tempdir().expect("tempdir");
    write_config(all.path(), &vec![sink.url(); WEBHOOKS]);
    let without_gone = tempfile::tempdir().expect("tempdir");
    write_config(without_gone.path(), &vec![sink.url(); GONE]);
    let url = server.url();
    let lease = ["--database-lease", "1s"];
    let first = start_replica(all.path(), &url, &lease).await;
    let client = client();
    let gone: BTreeSet<usize> = (0..POSTS).map(|n| n * WEBHOOKS + GONE).collect();
    let kept: BTreeSet<usize> = (0..POSTS).map(|n| n * WEBHOOKS).collect();
    for &seq in gone.iter().chain(&kept) {
        assert_eq!(post(&client, &first.url("/api/v1/alerts"), seq).await, 200);
    }
    // The first replica holds rows of both webhooks (claimed, failing), then dies.
    wait_for_sql(
        &server,
        "SELECT count(DISTINCT webhook) FROM herald_backlog WHERE claim_id IS NOT NULL",
        "2",
        Duration::from_secs(20),
    )
    .await;
    first.kill9();
    // The second replica does not have w9: once nobody has held w9's rows for ten leases,
    // it drops and records them; w0's rows it takes over and delivers.
    let second = start_replica(without_gone.path(), &url, &lease).await;
    sink.set_failing(false);
    sink.wait_for_all(&kept, Duration::from_secs(30)).await;
    second
        .wait_log(
            "dropped the stored deliveries of a webhook no replica has",
            Duration::from_secs(60),
        )
        .await;
    wait_for_sql(
        &server,
        "SELECT count(*) FROM herald_backlog",
        "0",
        Duration::from_secs(10),
    )
    .await;
    let outcomes = |webhook: usize| {
        server.psql(&format!(
            "SELECT outcome || ' ' || count(*) FROM herald_records WHERE webhook LIKE '%/w{webhook}' GROUP BY outcome"
        ))
    };
    assert_eq!(outcomes(GONE), format!("dropped {POSTS}"));
    assert_eq!(outcomes(0), format!("succeeded {POSTS}"));
    // The dropped deliveries were never sent.
    assert!(
        sink.seqs().is_disjoint(&gone),
        "a delivery of the deleted webhook arrived: {:?}",
        sink.seqs()
    );
    // The record says why, and either replica's API lists it.
    let listed = listed(&client, &second, "limit=0&outcome=Dropped").await;
    assert_eq!(listed.len(), POSTS, "{listed:?}");
    assert!(
        listed.iter().all(|r| r["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no longer exists on any replica")),
        "{listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_taking_over_a_delivery_being_retried_continues_its_retry_schedule() {
    const MAX_ATTEMPTS: usize = 5;
    let server = Postgres::start();
    // An endpoint that always fails, counting every attempt.
    let sink = herald_testkit::sink::Sink::http().await;
    sink.respond_with(vec![herald_testkit::sink::Reply::status(503)]);
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let url = server.url();
    let max_attempts = MAX_ATTEMPTS.to_string();
    let flags = [
        "--database-lease",
        "1s",
        "--retry-max-attempts",
        &max_attempts,
        // Attempts 1 to 2 s apart: the test sees each failure stored before the next attempt.
        "--retry-initial-backoff",
        "2s",
        "--retry-max-backoff",
        "2s",
    ];
    let first = start_replica(config.path(), &url, &flags).await;
    let client = client();
    assert_eq!(post(&client, &first.url("/api/v1/alerts"), 0).await, 200);
    // Two attempts failed and their schedule is in the row: the first replica stops there,
    // holding the claim, and never comes back.
    wait_for_sql(
        &server,
        "SELECT attempts FROM herald_backlog",
        "2",
        Duration::from_secs(30),
    )
    .await;
    first.signal("STOP");
    let stored_retry = server.psql(
        "SELECT first_attempt_at IS NOT NULL AND retry_at > first_attempt_at FROM herald_backlog",
    );
    assert_eq!(stored_retry, "t", "the retry schedule is in the row");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tried_by_first = sink.count();
    let stored: usize = server
        .psql("SELECT attempts FROM herald_backlog")
        .parse()
        .expect("a count");
    assert_eq!(
        stored, tried_by_first,
        "every failed attempt of the first replica is stored"
    );
    let second = start_replica(config.path(), &url, &flags).await;
    // The second replica takes the claim over once the lease has run out and makes only the
    // attempts left before the dead-letter limit.
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        if let Some(record) = listed(&client, &second, "limit=0").await.first() {
            break record.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no record; second replica's log:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let tried_by_second = sink.count() - tried_by_first;
    eprintln!(
        "retries taken over: {tried_by_first} attempts by the first replica, {tried_by_second} by the second; record: {record}"
    );
    assert_eq!(record["outcome"], "Failed", "{record}");
    assert_eq!(record["attempts"], MAX_ATTEMPTS, "{record}");
    assert_eq!(
        tried_by_second,
        MAX_ATTEMPTS - stored,
        "the second replica continues after attempt {stored} instead of starting again"
    );
    // The same delivery every time (one Idempotency-Key).
    let keys: BTreeSet<String> = sink
        .received()
        .iter()
        .filter_map(|r| r.header("idempotency-key"))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    wait_for_sql(
        &server,
        "SELECT count(*) FROM herald_backlog",
        "0",
        Duration::from_secs(10),
    )
    .await;
    first.kill9();
}
