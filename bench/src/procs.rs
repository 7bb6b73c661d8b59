//! What the benchmark reads from the processes under test (started with the harness's
//! [`herald_testkit::process::Process`]): Herald's webhook gauges, and how long a stop may take.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use herald_testkit::process::{Process, http_get_body};

/// How long a process under test gets to exit on SIGTERM before SIGKILL, when dropped.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Herald's `herald_webhooks` gauges: `(webhooks in the table, of which ready)`.
pub async fn webhook_counts(addr: &str) -> Option<(u64, u64)> {
    let metrics = http_get_body(addr, "/metrics").await?;
    let gauge = |ready: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("herald_webhooks{{ready=\"{ready}\"}} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    let ready = gauge("true")?;
    Some((ready + gauge("false").unwrap_or(0), ready))
}

/// Herald's `herald_webhooks{ready="true"}` gauge.
pub async fn ready_webhooks(addr: &str) -> Option<u64> {
    webhook_counts(addr).await.map(|(_, ready)| ready)
}

/// Fails unless Herald reports `expected` ready webhooks (within `timeout`).
pub async fn expect_ready_webhooks(
    proc: &mut Process,
    addr: &str,
    expected: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check_alive()?;
        let ready = ready_webhooks(addr).await;
        if ready == Some(expected as u64) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} reports {ready:?} ready webhooks, expected {expected}; last lines of {}:\n{}",
                proc.name(),
                proc.log_path().display(),
                proc.tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
