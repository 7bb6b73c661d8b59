//! The systems under test, each a process of its own: Herald (`herald run` on generated
//! manifests), the minimal forwarder, and Alertmanager with the equivalent routing tree.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::PER_TEAM;
use herald_testkit::process::{Process, free_port};

use crate::procs::STOP_GRACE;

/// A started system: its process and the address alerts go to.
pub struct Sut {
    pub proc: Process,
    pub addr: String,
    /// Time from spawn until it answered its readiness probe.
    pub ready_after: Duration,
    /// Further replicas of the same system (sharing one PostgreSQL database), each with the
    /// address it listens on: the load is spread over `addr` and these.
    pub replicas: Vec<(Process, String)>,
    /// The database server the system keeps its deliveries in, when it has one of its own
    /// (its postmaster's pid), so that its CPU is counted too.
    pub server_pid: Option<u32>,
}

impl Sut {
    /// A system of one process.
    pub fn single(proc: Process, addr: String, ready_after: Duration) -> Sut {
        Sut {
            proc,
            addr,
            ready_after,
            replicas: Vec::new(),
            server_pid: None,
        }
    }

    /// Every address alerts may go to.
    pub fn addrs(&self) -> Vec<String> {
        std::iter::once(self.addr.clone())
            .chain(self.replicas.iter().map(|(_, addr)| addr.clone()))
            .collect()
    }

    fn procs_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        std::iter::once(&mut self.proc).chain(self.replicas.iter_mut().map(|(p, _)| p))
    }

    /// CPU seconds of every replica.
    pub fn cpu_seconds(&self) -> f64 {
        self.proc.cpu_seconds()
            + self
                .replicas
                .iter()
                .map(|(p, _)| p.cpu_seconds())
                .sum::<f64>()
    }

    /// CPU seconds of the database server and its backends, if it has one.
    pub fn server_cpu_seconds(&self) -> Option<f64> {
        self.server_pid.and_then(crate::procs::tree_cpu_seconds)
    }

    /// Fails when a replica has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.procs_mut().try_for_each(Process::check_alive)
    }

    /// `(VmRSS, VmHWM)` in KiB: the largest of the replicas'.
    pub fn memory_kib(&self) -> (u64, u64) {
        std::iter::once(&self.proc)
            .chain(self.replicas.iter().map(|(p, _)| p))
            .map(Process::memory_kib)
            .fold((0, 0), |(r, h), (rr, hh)| (r.max(rr), h.max(hh)))
    }

    /// Stops every replica.
    pub fn stop(&mut self, grace: Duration) {
        self.procs_mut().for_each(|p| p.stop(grace));
    }
}

/// Webhook and NotificationCondition manifests for webhooks `from..to` delivering to `sink`:
/// webhook `wh-i` lists condition `cond-i` (`team In [team-{i/per_team}]`, `severity In
/// [critical, warning]`, `env NotIn [test, dev]`, `cluster Exists`).
pub fn herald_manifests(
    namespace: &str,
    from: usize,
    to: usize,
    per_team: usize,
    sink: &str,
) -> String {
    let mut yaml = String::new();
    for i in from..to {
        let team = i / per_team.max(1);
        let _ = write!(
            yaml,
            "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\n\
             metadata: {{name: cond-{i}, namespace: {namespace}}}\n\
             spec:\n  matchExpressions:\n\
             \x20   - {{key: team, operator: In, values: [team-{team}]}}\n\
             \x20   - {{key: severity, operator: In, values: [critical, warning]}}\n\
             \x20   - {{key: env, operator: NotIn, values: [test, dev]}}\n\
             \x20   - {{key: cluster, operator: Exists}}\n---\n\
             apiVersion: herald.dev/v1alpha1\nkind: Webhook\n\
             metadata: {{name: wh-{i}, namespace: {namespace}, labels: {{team: team-{team}}}}}\n\
             spec:\n  url: {sink}/wh-{i}\n  conditions: [cond-{i}]\n---\n"
        );
    }
    yaml
}

/// How many webhooks, and how many of them share a team (each alert goes to `per_team`).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub webhooks: usize,
    pub per_team: usize,
}

impl Shape {
    /// The teams alerts are spread over.
    pub fn teams(self) -> usize {
        self.webhooks.div_ceil(self.per_team.max(1)).max(1)
    }
}

/// `herald run` on generated webhooks, with its delivery store in `data_dir` or in PostgreSQL
/// at `database_url` when given (in memory otherwise).
pub async fn start_herald(
    herald: &Path,
    dir: &Path,
    shape: Shape,
    sink: &str,
    data_dir: Option<&Path>,
    database_url: Option<&str>,
) -> Result<Sut> {
    let webhooks = shape.webhooks;
    let config = dir.join("herald-config");
    std::fs::create_dir_all(&config)?;
    // serde-saphyr refuses more than 1,024 documents in one file (its default budget), so
    // `herald run` cannot read 10,000 webhooks from one file: 100 webhooks per file.
    for (file, from) in (0..webhooks).step_by(100).enumerate() {
        std::fs::write(
            config.join(format!("bench-{file:03}.yaml")),
            herald_manifests(
                "default",
                from,
                (from + 100).min(webhooks),
                shape.per_team,
                sink,
            ),
        )?;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(herald);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--listen", &addr, "--admin-listen", "127.0.0.1:0"])
        .args(
            data_dir
                .map(|d| ["--data-dir".as_ref(), d.as_os_str()])
                .into_iter()
                .flatten(),
        )
        .args(
            database_url
                .map(|url| ["--database-url", url])
                .into_iter()
                .flatten(),
        )
        .env(
            "RUST_LOG",
            std::env::var("HERALD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let mut proc =
        Process::spawn("herald", cmd, &dir.join("herald.log"))?.with_stop_grace(STOP_GRACE);
    let ready_after = proc
        .wait_http_ok(&addr, "/readyz", Duration::from_secs(60))
        .await?;
    crate::procs::expect_ready_webhooks(&mut proc, &addr, webhooks, Duration::from_secs(10))
        .await?;
    Ok(Sut::single(proc, addr, ready_after))
}

/// `replicas` processes of `herald run` on one PostgreSQL database (see [`start_herald`]), as
/// one system whose load is spread over them.
pub async fn start_herald_replicas(
    herald: &Path,
    dir: &Path,
    shape: Shape,
    sink: &str,
    database_url: &str,
    replicas: usize,
) -> Result<Sut> {
    let mut first = start_herald(herald, dir, shape, sink, None, Some(database_url)).await?;
    for replica in 1..replicas {
        let dir = dir.join(format!("replica-{replica}"));
        std::fs::create_dir_all(&dir)?;
        let more = start_herald(herald, &dir, shape, sink, None, Some(database_url)).await?;
        first.ready_after = first.ready_after.max(more.ready_after);
        first.replicas.push((more.proc, more.addr));
    }
    Ok(first)
}

/// The forwarder, as `herald-bench forwarder`.
pub async fn start_forwarder(dir: &Path, shape: Shape, sink: &str) -> Result<Sut> {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(std::env::current_exe().context("locating herald-bench")?);
    cmd.args(["forwarder", "--listen", &addr, "--sink", sink])
        .args(["--webhooks", &shape.webhooks.to_string()])
        .args(["--per-team", &shape.per_team.to_string()]);
    let mut proc =
        Process::spawn("forwarder", cmd, &dir.join("forwarder.log"))?.with_stop_grace(STOP_GRACE);
    let ready_after = proc
        .wait_http_ok(&addr, "/healthz", Duration::from_secs(30))
        .await?;
    Ok(Sut::single(proc, addr, ready_after))
}

/// Alertmanager's configuration equivalent to [`herald_manifests`]: one webhook receiver per
/// webhook, one child route per webhook with the condition's matchers and `continue: true`,
/// every alert its own group (`group_by: ['...']`) flushed at once (`group_wait: 0s`).
pub fn alertmanager_config(webhooks: usize, sink: &str) -> String {
    let mut yaml = String::from(
        "route:\n  receiver: unmatched\n  group_by: ['...']\n  group_wait: 0s\n\
         \x20 group_interval: 5m\n  repeat_interval: 4h\n  routes:\n",
    );
    for i in 0..webhooks {
        let team = i / PER_TEAM;
        let _ = write!(
            yaml,
            "    - receiver: wh-{i}\n      continue: true\n      matchers:\n\
             \x20       - team=\"team-{team}\"\n\
             \x20       - severity=~\"critical|warning\"\n\
             \x20       - env!~\"test|dev\"\n\
             \x20       - cluster=~\".+\"\n"
        );
    }
    yaml.push_str("receivers:\n  - name: unmatched\n");
    for i in 0..webhooks {
        let _ = write!(
            yaml,
            "  - name: wh-{i}\n    webhook_configs:\n      - url: {sink}/wh-{i}\n        send_resolved: true\n"
        );
    }
    yaml
}

/// Debian's `prometheus-alertmanager` with [`alertmanager_config`], gossip off.
pub async fn start_alertmanager(dir: &Path, webhooks: usize, sink: &str) -> Result<Sut> {
    let binary = ["prometheus-alertmanager", "alertmanager"]
        .iter()
        .find_map(|name| find_on_path(name))
        .context(
            "prometheus-alertmanager not found on PATH: apt-get install -y prometheus-alertmanager",
        )?;
    let config = dir.join("alertmanager.yml");
    std::fs::write(&config, alertmanager_config(webhooks, sink))?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(binary);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--cluster.listen-address=")
        .arg("--log.level=warn");
    let mut proc = Process::spawn("alertmanager", cmd, &dir.join("alertmanager.log"))?
        .with_stop_grace(STOP_GRACE);
    let ready_after = proc
        .wait_http_ok(&addr, "/-/ready", Duration::from_secs(30))
        .await?;
    Ok(Sut::single(proc, addr, ready_after))
}

/// The version line of a binary (`--version`).
pub fn version(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
