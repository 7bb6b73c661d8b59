//! The delivery promise under load, with real processes on loopback: a flood over ten webhooks
//! whose endpoint is slower than the load (every delivery answered 200 arrives; overload shows
//! only as 503), a dead webhook beside nine healthy ones (its backlog is kept and delivered when
//! it comes back), and a durable Herald killed with SIGKILL at random points of a flood (nothing
//! that got a 200 is lost; duplicates, with the same Idempotency-Key, are counted). Figures are
//! printed with `eprintln!` (run with `--nocapture`); no test asserts a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use cli::Running;
use flood::{CountingSink, WEBHOOKS, payload, write_config};
use futures::StreamExt as _;
use herald_testkit::{cli, flood, process};
use process::free_port;
use rand::Rng as _;
use serde_json::Value;

/// What the receiver answered to one post.
#[derive(Debug)]
enum Answer {
    Accepted { sent: Instant },
    Refused,
    Failed,
}

/// Posts alerts `seqs` (one per request), `in_flight` at a time, paced at `rate` requests per
/// second when given; returns each answer.
async fn flood(
    url: &str,
    seqs: std::ops::Range<usize>,
    in_flight: usize,
    rate: Option<u32>,
) -> BTreeMap<usize, Answer> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(in_flight)
        .build()
        .expect("client");
    let started = Instant::now();
    let first = seqs.start;
    futures::stream::iter(seqs)
        .map(|seq| {
            let (client, url) = (client.clone(), url.to_string());
            async move {
                if let Some(rate) = rate {
                    let due =
                        started + Duration::from_secs_f64((seq - first) as f64 / f64::from(rate));
                    tokio::time::sleep_until(due.into()).await;
                }
                let sent = Instant::now();
                let answer = match client.post(url).json(&payload(seq)).send().await {
                    Ok(r) if r.status() == 200 => Answer::Accepted { sent },
                    Ok(r) if r.status() == 503 => {
                        assert!(
                            r.headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                                .is_some(),
                            "a 503 without Retry-After"
                        );
                        Answer::Refused
                    }
                    Ok(r) => panic!("unexpected status {} for post {seq}", r.status()),
                    Err(_) => Answer::Failed,
                };
                (seq, answer)
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await
}

fn accepted(answers: &BTreeMap<usize, Answer>) -> BTreeSet<usize> {
    answers
        .iter()
        .filter(|(_, a)| matches!(a, Answer::Accepted { .. }))
        .map(|(seq, _)| *seq)
        .collect()
}

fn count(answers: &BTreeMap<usize, Answer>, what: fn(&Answer) -> bool) -> usize {
    answers.values().filter(|a| what(a)).count()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Time from each accepted post to its arrival, for the webhooks in `targets`, sorted.
fn latencies(
    answers: &BTreeMap<usize, Answer>,
    sink: &CountingSink,
    targets: impl Fn(usize) -> bool,
) -> Vec<Duration> {
    let arrived: HashMap<usize, Instant> = sink
        .arrivals()
        .iter()
        .flat_map(|a| a.seqs.iter().map(|s| (*s, a.at)))
        .collect();
    let mut out: Vec<Duration> = answers
        .iter()
        .filter(|(seq, _)| targets(**seq % WEBHOOKS))
        .filter_map(|(seq, answer)| match answer {
            Answer::Accepted { sent } => Some(arrived.get(seq)?.saturating_duration_since(*sent)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// The flood of the report that found deliveries dropped after a 200: ten webhooks, one alert
/// per request, an endpoint slower than the load. Every delivery answered 200 arrives; what
/// does not fit is refused with 503 and Retry-After.
async fn flood_over_ten_webhooks(durable: bool) {
    const POSTS: usize = 8_000;
    // One attempt at a time per webhook and 4 ms per request: at most 2,500 deliveries/s.
    let sink = CountingSink::start(0, Duration::from_millis(4)).await;
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let data = tempfile::tempdir().expect("tempdir");
    let data_arg = data.path().to_str().expect("utf-8").to_string();
    let mut args = vec!["--max-pending", "1000", "--overload-wait", "20ms"];
    if durable {
        args.extend(["--data-dir", &data_arg]);
    }
    let running = Running::start(config.path(), &args).await;
    let started = Instant::now();
    let answers = flood(&running.url("/api/v1/alerts"), 0..POSTS, 64, None).await;
    let offered = started.elapsed();
    let accepted = accepted(&answers);
    let refused = count(&answers, |a| matches!(a, Answer::Refused));
    let failed = count(&answers, |a| matches!(a, Answer::Failed));
    assert_eq!(failed, 0, "requests failed outright");
    sink.wait_for_all(&accepted, Duration::from_secs(120)).await;
    let drained = started.elapsed();
    let arrived = sink.seqs();
    let lost = accepted.difference(&arrived).count();
    eprintln!(
        "flood ({}): {POSTS} posts in {offered:.1?}: {} answered 200, {refused} answered 503; \
         all {} arrived after {drained:.1?}; lost {lost}",
        if durable { "--data-dir" } else { "in memory" },
        accepted.len(),
        accepted.len(),
    );
    assert_eq!(lost, 0);
    if !durable {
        // Only the memory budget runs out under this load; a disk store takes the backlog.
        assert!(refused > 0, "the flood never filled the budget");
    }
    assert!(!running.log().contains("dead letter"), "{}", running.log());
}

#[tokio::test]
async fn a_flood_over_ten_webhooks_delivers_everything_answered_200_in_memory() {
    flood_over_ten_webhooks(false).await;
}

#[tokio::test]
async fn a_flood_over_ten_webhooks_delivers_everything_answered_200_on_disk() {
    flood_over_ten_webhooks(true).await;
}

/// The same paced load with ten healthy webhooks, then with `w0` dead (nothing listens on its
/// port): the nine others' latencies are printed for both; the dead one's backlog is kept and
/// delivered once its endpoint comes back.
#[tokio::test]
async fn a_dead_webhook_keeps_its_backlog_and_does_not_hold_up_the_others() {
    const POSTS: usize = 3_000;
    const RATE: u32 = 500;
    let sink = CountingSink::start(0, Duration::ZERO).await;
    let data = tempfile::tempdir().expect("tempdir");
    let data_arg = data.path().to_str().expect("utf-8").to_string();
    let args = ["--data-dir", &data_arg, "--retry-max-attempts", "100000"];

    // Baseline: ten healthy webhooks.
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let running = Running::start(config.path(), &args).await;
    let answers = flood(&running.url("/api/v1/alerts"), 0..POSTS, 32, Some(RATE)).await;
    sink.wait_for_all(&accepted(&answers), Duration::from_secs(60))
        .await;
    let baseline = latencies(&answers, &sink, |w| w != 0);
    drop(running);

    // w0 dead.
    let dead_port = free_port();
    let mut urls = vec![sink.url(); WEBHOOKS];
    urls[0] = format!("http://127.0.0.1:{dead_port}/");
    write_config(config.path(), &urls);
    let running = Running::start(config.path(), &args).await;
    let seqs = POSTS..2 * POSTS;
    let answers = flood(&running.url("/api/v1/alerts"), seqs, 32, Some(RATE)).await;
    let accepted = accepted(&answers);
    let healthy: BTreeSet<usize> = accepted
        .iter()
        .copied()
        .filter(|s| s % WEBHOOKS != 0)
        .collect();
    sink.wait_for_all(&healthy, Duration::from_secs(60)).await;
    let beside_dead = latencies(&answers, &sink, |w| w != 0);
    let p = |v: &[Duration], q| percentile(v, q).as_secs_f64() * 1000.0;
    eprintln!(
        "nine healthy webhooks at {RATE} requests/s: p50 {:.1} ms, p99 {:.1} ms alone; \
         p50 {:.1} ms, p99 {:.1} ms beside a dead one",
        p(&baseline, 50.0),
        p(&baseline, 99.0),
        p(&beside_dead, 50.0),
        p(&beside_dead, 99.0),
    );
    assert_eq!(
        count(&answers, |a| !matches!(a, Answer::Accepted { .. })),
        0,
        "the dead webhook made Herald refuse alerts"
    );

    // The dead endpoint comes back: its whole backlog arrives.
    let revived = CountingSink::start(dead_port, Duration::ZERO).await;
    let dead: BTreeSet<usize> = accepted
        .iter()
        .copied()
        .filter(|s| s % WEBHOOKS == 0)
        .collect();
    let back = Instant::now();
    revived.wait_for_all(&dead, Duration::from_secs(120)).await;
    eprintln!(
        "the dead webhook's backlog of {} deliveries arrived {:.1?} after its endpoint came back",
        dead.len(),
        back.elapsed()
    );
}

/// A durable Herald killed with SIGKILL at a random point of a flood, ten times, restarted on
/// the same directory each time: every alert that got a 200 arrives at last.
#[tokio::test]
async fn kill_9_during_a_flood_loses_nothing_answered_200() {
    const ROUNDS: usize = 10;
    const POSTS_PER_ROUND: usize = 1_500;
    let sink = CountingSink::start(0, Duration::from_millis(1)).await;
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let data = tempfile::tempdir().expect("tempdir");
    let data_arg = data.path().to_str().expect("utf-8").to_string();
    let args = ["--data-dir", data_arg.as_str()];
    let mut accepted = BTreeSet::new();
    for round in 0..ROUNDS {
        let running = Running::start(config.path(), &args).await;
        let url = running.url("/api/v1/alerts");
        let seqs = round * POSTS_PER_ROUND..(round + 1) * POSTS_PER_ROUND;
        let kill_after = Duration::from_millis(rand::rng().random_range(50..600));
        let posting = tokio::spawn(async move { flood(&url, seqs, 32, None).await });
        tokio::time::sleep(kill_after).await;
        running.kill9();
        let answers = posting.await.expect("flood");
        let got = self::accepted(&answers);
        eprintln!(
            "round {round}: killed after {kill_after:?}; {} of {POSTS_PER_ROUND} posts answered 200",
            got.len()
        );
        accepted.extend(got);
    }
    let _running = Running::start(config.path(), &args).await;
    sink.wait_for_all(&accepted, Duration::from_secs(180)).await;
    let arrivals = sink.arrivals();
    let duplicates = sink.duplicates();
    // A duplicate is the same delivery again: same key, same alert.
    let mut seq_of_key: HashMap<&str, &Vec<usize>> = HashMap::new();
    for arrival in &arrivals {
        let first = seq_of_key
            .entry(arrival.key.as_str())
            .or_insert(&arrival.seqs);
        assert_eq!(*first, &arrival.seqs, "one Idempotency-Key, two contents");
    }
    eprintln!(
        "kill -9 x{ROUNDS}: {} alerts answered 200, all arrived; {} deliveries, {duplicates} of them \
         sent again with the same Idempotency-Key",
        accepted.len(),
        arrivals.len(),
    );
}

/// The dead-letter end of a full backlog: a webhook whose backlog is at `--backlog-limit` turns
/// further deliveries into dead letters with their content, which replay once it catches up.
#[tokio::test]
async fn a_full_backlog_turns_new_deliveries_into_replayable_dead_letters() {
    let dead_port = free_port();
    let config = tempfile::tempdir().expect("tempdir");
    let mut urls = vec![format!("http://127.0.0.1:{dead_port}/"); WEBHOOKS];
    urls[1] = urls[0].clone();
    write_config(config.path(), &urls);
    let data = tempfile::tempdir().expect("tempdir");
    let data_arg = data.path().to_str().expect("utf-8").to_string();
    let running = Running::start(
        config.path(),
        &["--data-dir", &data_arg, "--backlog-limit", "5"],
    )
    .await;
    // Seven alerts for w0: five fill its backlog, two become dead letters.
    for i in 0..7 {
        let (status, body) = running.post_alerts(&payload(i * WEBHOOKS)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body.get("dropped"), None, "{body}");
    }
    running
        .wait_log(
            "the webhook's backlog is near its limit",
            Duration::from_secs(10),
        )
        .await;
    // Records are written in batches after the reply: wait (bounded) until both are stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (records, dead_letters) = loop {
        let records: Value = reqwest::get(format!(
            "{}/api/v1/deliveries?webhook=default/w0&outcome=Failed",
            running.admin_url()
        ))
        .await
        .expect("records")
        .json()
        .await
        .expect("json");
        let dead_letters = records["deliveries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if dead_letters.len() >= 2 || Instant::now() > deadline {
            break (records, dead_letters);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead_letters.len(), 2, "{records}");
    assert!(
        dead_letters.iter().all(
            |r| r["error"].as_str().is_some_and(|e| e.contains("backlog"))
                && r["delivery"]["alerts"].is_array()
        ),
        "{records}"
    );
    let metrics = reqwest::get(running.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("herald_deliveries_total")
                && l.contains("outcome=\"overflowed\"")
                && l.trim_end().ends_with(" 2")),
        "{metrics}"
    );
    // The endpoint comes back: the backlog goes out, then the dead letters replay.
    let sink = CountingSink::start(dead_port, Duration::ZERO).await;
    sink.wait_for_all(
        &(0..5).map(|i| i * WEBHOOKS).collect(),
        Duration::from_secs(60),
    )
    .await;
    let client = reqwest::Client::new();
    for record in &dead_letters {
        let id = record["id"].as_str().expect("id");
        let replayed = client
            .post(format!(
                "{}/api/v1/deliveries/{id}/replay",
                running.admin_url()
            ))
            .send()
            .await
            .expect("replay");
        assert_eq!(replayed.status(), 202);
    }
    sink.wait_for_all(
        &(0..7).map(|i| i * WEBHOOKS).collect(),
        Duration::from_secs(60),
    )
    .await;
}

/// SIGTERM: Herald stops accepting at once but keeps delivering what it holds for most of
/// `--shutdown-timeout` before it exits; what it could not deliver stays in the store and the
/// next start sends it.
#[tokio::test]
async fn sigterm_stops_accepting_and_delivers_the_backlog_before_exiting() {
    const POSTS: usize = 200;
    // One attempt at a time per webhook, 50 ms each: about a second of work per webhook.
    let sink = CountingSink::start(0, Duration::from_millis(50)).await;
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &vec![sink.url(); WEBHOOKS]);
    let data = tempfile::tempdir().expect("tempdir");
    let data_arg = data.path().to_str().expect("utf-8").to_string();
    let args = ["--data-dir", data_arg.as_str(), "--shutdown-timeout", "30s"];
    let running = Running::start(config.path(), &args).await;
    let url = running.url("/api/v1/alerts");
    let answers = flood(&url, 0..POSTS, 16, None).await;
    let accepted = accepted(&answers);
    assert_eq!(accepted.len(), POSTS);
    let before = sink.seqs().len();
    let url_after = url.clone();
    let status = tokio::task::spawn_blocking(move || running.terminate())
        .await
        .expect("terminate");
    assert!(status.success(), "{status:?}");
    let at_exit = sink.seqs();
    eprintln!(
        "SIGTERM with {} of {POSTS} delivered; {} delivered when the process exited",
        before,
        at_exit.len()
    );
    assert!(
        accepted.is_subset(&at_exit),
        "the backlog was not delivered during the grace period: {} missing",
        accepted.difference(&at_exit).count()
    );
    // Nothing listens any more.
    assert!(
        reqwest::Client::new()
            .post(&url_after)
            .json(&payload(0))
            .send()
            .await
            .is_err()
    );
}
