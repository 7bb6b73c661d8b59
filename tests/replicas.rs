//! Replicas sharing one queue in PostgreSQL, as real processes on loopback: `herald run` with
//! `--database-url` against a real server started by the test (testkit/src/postgres.rs).
//! Three replicas behind an endpoint that fails for a while, one killed with SIGKILL
//! mid-flood (every delivery answered 200 arrives; duplicates, by Idempotency-Key, are
//! counted); a replica paused with SIGSTOP past its lease (another takes its claims, and its
//! late finishes are refused); the database stopped during a flood (503s while it is down,
//! nothing accepted lost, recovery without restarting Herald); replicas starting together on an
//! empty database. Figures are printed with `eprintln!`; no test asserts a time.

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

async fn start_replica(config: &Path, url: &str, extra: &[&str]) -> Running {
    let mut args = vec![
        "--database-url",
        url,
        "--database-lease",
        "2s",
        "--retry-max-attempts",
        "100000",
        "--retry-max-elapsed",
        "10m",
    ];
    args.extend_from_slice(extra);
    Running::start(config, &args).await
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
        let listed: Value = client
            .get(format!("{}/api/v1/deliveries?limit=0", replica.admin_url()))
            .send()
            .await
            .expect("list deliveries")
            .json()
            .await
            .expect("json");
        let listed = listed["deliveries"].as_array().expect("deliveries");
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
    assert_eq!(server.psql("SELECT count(*) FROM herald_migrations"), "1");
    let client = client();
    assert_eq!(post(&client, &first.url("/api/v1/alerts"), 1).await, 200);
    assert_eq!(post(&client, &second.url("/api/v1/alerts"), 2).await, 200);
    sink.wait_for_all(&BTreeSet::from([1, 2]), Duration::from_secs(30))
        .await;
}
