//! Real Alertmanager and Prometheus processes (Debian's `prometheus-alertmanager` and
//! `prometheus` packages) for end-to-end tests of the alert path.
//!
//! Both processes listen on `127.0.0.1` on a free port, keep their state in a temporary
//! directory, log to a file there (see `log()`), and are killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{Process, free_port};
use crate::tools;

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

/// A server process on a free port with its temporary directory (state, config, log).
struct Server {
    process: Process,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `binary` with the arguments `args(dir, addr)` on a free port and waits until
    /// `GET ready_path` answers 2xx, retrying on a fresh port if the process exits early.
    async fn start(
        name: &'static str,
        binary: &Path,
        ready_path: &str,
        dir: tempfile::TempDir,
        args: impl Fn(&Path, SocketAddr) -> Vec<String>,
    ) -> Server {
        let root = dir.path().to_path_buf();
        for attempt in 1..=START_ATTEMPTS {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut command = Command::new(binary);
            command.args(args(&root, addr)).current_dir(&root);
            let log = root.join(format!("{name}-{attempt}.log"));
            let mut process =
                Process::spawn(name, command, &log).unwrap_or_else(|e| panic!("{e:#}"));
            let ready_url = format!("http://{addr}{ready_path}");
            match process.wait_answering(&ready_url, READY_TIMEOUT).await {
                Ok(()) => {
                    return Server {
                        process,
                        addr,
                        _dir: dir,
                    };
                }
                Err(exited) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "{name} exited before it was ready ({exited}), retrying on another port; log:\n{}",
                        process.log()
                    );
                }
                Err(exited) => panic!(
                    "{name} exited before it was ready ({exited}); log:\n{}",
                    process.log()
                ),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.process.log()
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
    server: Server,
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
        let server = Server::start("alertmanager", &binary, "/-/ready", dir, |root, addr| {
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
            addr: server.addr,
            server,
        }
    }

    /// `http://127.0.0.1:PORT` (also its `--web.external-url`, so the `externalURL` of
    /// every notification it sends).
    pub fn base(&self) -> String {
        self.server.url("")
    }

    /// A URL on the API.
    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// Everything Alertmanager logged so far.
    pub fn log(&self) -> String {
        self.server.log()
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
    server: Server,
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
        let server = Server::start("prometheus", &binary, "/-/ready", dir, |root, addr| {
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
            addr: server.addr,
            server,
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
        let server = Server::start("prometheus", &binary, "/-/ready", dir, |root, addr| {
            vec![
                format!("--config.file={}", root.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", root.join("data").display()),
                format!("--web.listen-address={addr}"),
            ]
        })
        .await;
        Prometheus {
            addr: server.addr,
            server,
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
        self.server.url(path)
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        self.server.log()
    }
}
