//! Real Alertmanager and Prometheus processes (Debian's `prometheus-alertmanager` and
//! `prometheus` packages) for end-to-end tests of the alert path.
//!
//! Include it next to `process.rs`, whose `free_port` it uses:
//!
//! ```ignore
//! #[path = "support/process.rs"]
//! mod process;
//! #[path = "support/alertmanager.rs"]
//! mod alertmanager;
//! ```
//!
//! Both processes listen on `127.0.0.1` on a free port, keep their state in a temporary
//! directory, log to a file there (see `log()`), and are killed when dropped.
#![allow(dead_code)]

// Each harness stands alone, so a test using two of them holds two copies of the check.
#[allow(clippy::duplicate_mod)]
#[path = "tools.rs"]
mod tools;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a process may take to answer its readiness endpoint.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Start attempts: the free port is released before the process binds it, so a parallel test
/// can occasionally take it first.
const START_ATTEMPTS: usize = 3;

/// Finds `name` on `PATH`, else in `/usr/bin` or `/usr/sbin`, after checking every tool the
/// suite needs (see [`tools::require_all`]); panics with the apt package to install.
pub fn find_binary(name: &str, package: &str) -> PathBuf {
    tools::require_all();
    tools::find_command(name).unwrap_or_else(|| {
        panic!(
            "`{name}` not found on PATH or in /usr/bin: these tests need a real {name}; \
             install it with `apt-get install -y {package}` (as root)"
        )
    })
}

/// A child process with its temporary directory and log file; killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// State, config and logs; `None` only while being handed to a retry.
    dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// Starts `binary` with the arguments `args(dir, addr)` on a free port and waits until
    /// `GET ready_path` answers 2xx, retrying on a fresh port if the process exits early.
    async fn start(
        name: &'static str,
        binary: &Path,
        ready_path: &str,
        dir: tempfile::TempDir,
        args: impl Fn(&Path, SocketAddr) -> Vec<String>,
    ) -> Proc {
        let mut dir = Some(dir);
        for attempt in 1..=START_ATTEMPTS {
            let addr: SocketAddr = format!("127.0.0.1:{}", crate::process::free_port())
                .parse()
                .expect("addr");
            let root = dir.as_ref().expect("dir").path().to_path_buf();
            let log = root.join(format!("{name}-{attempt}.log"));
            let stdout = std::fs::File::create(&log).expect("log file");
            let stderr = stdout.try_clone().expect("log file");
            let child = Command::new(binary)
                .args(args(&root, addr))
                .current_dir(&root)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            let mut proc = Proc {
                name,
                child,
                addr,
                log,
                dir: dir.take(),
            };
            match proc.wait_ready(ready_path).await {
                Ok(()) => return proc,
                Err(exited) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "{name} exited before it was ready ({exited}), retrying on another port; log:\n{}",
                        proc.log()
                    );
                    // Keep the directory (and its config) for the next attempt.
                    let _ = proc.child.kill();
                    let _ = proc.child.wait();
                    dir = proc.dir.take();
                }
                Err(exited) => panic!(
                    "{name} exited before it was ready ({exited}); log:\n{}",
                    proc.log()
                ),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Polls `path` until it answers 2xx. Err when the process exited (so the caller may
    /// retry); panics when it is still running but not ready after `READY_TIMEOUT`.
    async fn wait_ready(&mut self, path: &str) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(status.to_string());
            }
            if let Ok(r) = client.get(self.url(path)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready at {} within {READY_TIMEOUT:?}; log:\n{}",
                self.name,
                self.url(path),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what Alertmanager or Prometheus saw (the last lines suffice).
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("--- {} log (last 60 lines) ---\n{tail}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------
// Alertmanager
// ---------------------------------------------------------------------------

/// A running `prometheus-alertmanager` whose single route sends every alert, grouped by
/// `alertname`, to one webhook receiver with `send_resolved: true`, `group_wait: 1s`,
/// `group_interval: 1s` and `repeat_interval: 1h`. Gossip is off
/// (`--cluster.listen-address=`).
pub struct Alertmanager {
    proc: Proc,
    /// The API address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
}

impl Alertmanager {
    /// Starts Alertmanager with the receiver `webhook_url` (e.g. Herald's
    /// `http://127.0.0.1:PORT/api/v1/alerts`) and waits for `/-/ready`.
    pub async fn start(webhook_url: &str) -> Alertmanager {
        Alertmanager::start_with(webhook_url, "").await
    }

    /// [`Alertmanager::start`] with more settings for the webhook config (each line indented
    /// by eight spaces, e.g. `        max_alerts: 1`).
    pub async fn start_with(webhook_url: &str, webhook_settings: &str) -> Alertmanager {
        let binary = find_binary("prometheus-alertmanager", "prometheus-alertmanager");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                r#"global:
  resolve_timeout: 5m
route:
  receiver: herald
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: herald
    webhook_configs:
      - url: '{webhook_url}'
        send_resolved: true
{webhook_settings}
"#
            ),
        )
        .expect("write alertmanager.yml");
        let proc = Proc::start("alertmanager", &binary, "/-/ready", dir, |root, addr| {
            vec![
                format!("--config.file={}", root.join("alertmanager.yml").display()),
                format!("--storage.path={}", root.join("data").display()),
                format!("--web.listen-address={addr}"),
                format!("--web.external-url=http://{addr}"),
                "--cluster.listen-address=".to_string(),
                "--log.level=debug".to_string(),
            ]
        })
        .await;
        Alertmanager {
            addr: proc.addr,
            proc,
        }
    }

    /// `http://127.0.0.1:PORT` (also its `--web.external-url`, so the `externalURL` of
    /// every notification it sends).
    pub fn base(&self) -> String {
        self.proc.url("")
    }

    /// A URL on the API.
    pub fn url(&self, path: &str) -> String {
        self.proc.url(path)
    }

    /// Everything Alertmanager logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// `POST /api/v2/alerts` with a JSON array of alerts (labels, annotations, startsAt,
    /// endsAt, generatorURL), the way Prometheus sends them; panics unless it answers 200.
    pub async fn push_alerts(&self, alerts: &Value) {
        let response = reqwest::Client::new()
            .post(self.url("/api/v2/alerts"))
            .json(alerts)
            .send()
            .await
            .expect("post to alertmanager");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "alertmanager rejected the alerts: {status} {body}; log:\n{}",
            self.log()
        );
    }

    /// `GET /api/v2/alerts`: the alerts Alertmanager currently holds (each with `labels`,
    /// `fingerprint`, `status.state`, `receivers`, ...).
    pub async fn alerts(&self) -> Vec<Value> {
        let response = reqwest::Client::new()
            .get(self.url("/api/v2/alerts"))
            .send()
            .await
            .expect("get alertmanager alerts");
        assert!(response.status().is_success(), "{}", response.status());
        match response.json().await.expect("alertmanager alerts JSON") {
            Value::Array(alerts) => alerts,
            other => panic!("alertmanager /api/v2/alerts is not an array: {other}"),
        }
    }

    /// Polls `GET /api/v2/alerts` until `done` holds for the list and returns it; panics
    /// with the last list and the log after `timeout`.
    pub async fn wait_alerts(
        &self,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let alerts = self.alerts().await;
            if done(&alerts) {
                return alerts;
            }
            assert!(
                Instant::now() < deadline,
                "alertmanager's alerts never reached the expected state within {timeout:?}: {}\nlog:\n{}",
                Value::Array(alerts),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

/// A running `prometheus` evaluating one rule file every second and sending its alerts to
/// one Alertmanager.
pub struct Prometheus {
    proc: Proc,
    /// The web/API address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus with `rules` (the content of a rule file) evaluated every second,
    /// alerting to `alertmanager`, and waits for `/-/ready`.
    pub async fn start(rules: &str, alertmanager: &Alertmanager) -> Prometheus {
        let binary = find_binary("prometheus", "prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("rules.yml"), rules).expect("write rules.yml");
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
alerting:
  alertmanagers:
    - static_configs:
        - targets: ['{am}']
scrape_configs: []
"#,
                am = alertmanager.addr
            ),
        )
        .expect("write prometheus.yml");
        let proc = Proc::start("prometheus", &binary, "/-/ready", dir, |root, addr| {
            vec![
                format!("--config.file={}", root.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", root.join("data").display()),
                format!("--web.listen-address={addr}"),
                // Alerts' generatorURL starts with this.
                format!("--web.external-url=http://{addr}"),
                // Send alerts to Alertmanager as soon as they fire, and again soon if lost.
                "--rules.alert.resend-delay=1s".to_string(),
            ]
        })
        .await;
        Prometheus {
            addr: proc.addr,
            proc,
        }
    }

    /// Starts Prometheus scraping `target`'s `/metrics` every second (no rules, no alerting).
    pub async fn scraping(target: SocketAddr) -> Prometheus {
        let binary = find_binary("prometheus", "prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: herald\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let proc = Proc::start("prometheus", &binary, "/-/ready", dir, |root, addr| {
            vec![
                format!("--config.file={}", root.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", root.join("data").display()),
                format!("--web.listen-address={addr}"),
            ]
        })
        .await;
        Prometheus {
            addr: proc.addr,
            proc,
        }
    }

    /// Runs an instant query and returns the `data.result` array.
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let body: serde_json::Value = reqwest::Client::new()
            .get(self.url("/api/v1/query"))
            .query(&[("query", promql)])
            .send()
            .await
            .expect("query Prometheus")
            .json()
            .await
            .expect("query answer");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A URL on the API.
    pub fn url(&self, path: &str) -> String {
        self.proc.url(path)
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}
