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

/// CPU seconds of a process and its children: its own, its reaped children's (cutime,
/// cstime), and its live children's (a database server and the backends it forked).
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    // `/proc/PID/stat` counts in USER_HZ, 100 on Linux whatever the kernel's tick.
    const USER_HZ: f64 = 100.0;
    let fields = |pid: u32| -> Option<Vec<String>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state is field 3.
        let rest = &stat[stat.rfind(')')? + 1..];
        Some(rest.split_whitespace().map(str::to_string).collect())
    };
    let ticks = |f: &[String], at: usize| f.get(at).and_then(|v| v.parse::<f64>().ok());
    let own = fields(pid)?;
    let mut total = ticks(&own, 11)? + ticks(&own, 12)? + ticks(&own, 13)? + ticks(&own, 14)?;
    let parent = pid.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // The parent's pid is the field after the state.
        if let Some(f) = fields(child).filter(|f| f.get(1) == Some(&parent)) {
            total += ticks(&f, 11).unwrap_or(0.0) + ticks(&f, 12).unwrap_or(0.0);
        }
    }
    Some(total / USER_HZ)
}
