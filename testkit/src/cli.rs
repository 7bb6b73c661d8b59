//! Runs the `herald` binary as a real process for end-to-end tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{Process, free_port};

/// The `herald` binary of this build: `$CARGO_BIN_EXE_herald`, which cargo sets for Herald's
/// integration tests, else `herald` beside the directory of the running test binary
/// (`target/debug/deps/NAME-HASH` → `target/debug/herald`).
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("CARGO_BIN_EXE_herald").filter(|p| !p.is_empty()) {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let dir = exe.parent().expect("the test binary's directory");
        let dir = if dir.ends_with("deps") {
            dir.parent().expect("the target directory")
        } else {
            dir
        };
        let herald = dir.join("herald");
        assert!(
            herald.is_file(),
            "the herald binary is not at {}: run the tests with `cargo test` (which builds it)",
            herald.display()
        );
        herald
    })
}

/// Runs a `herald` command to completion.
pub fn herald(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run herald")
}

/// A `herald run` process; killed when dropped.
pub struct Running {
    process: Process,
    /// Receiver address.
    pub addr: SocketAddr,
    /// Admin listener address.
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Starts `herald run --config DIR` with fast reloads and retries (unless `extra` sets the
    /// retry backoffs), and waits for `/readyz`.
    pub async fn start(config: &Path, extra: &[&str]) -> Running {
        Running::start_resolving(config, extra, None).await
    }

    /// [`Running::start`] in a mount namespace of its own where `/etc/hosts` is `hosts` (lines
    /// of `ADDRESS NAME`): names that resolve, through the system resolver as in production,
    /// to whatever address a test needs, without touching the machine's own `/etc/hosts`.
    /// Needs root and `unshare` (util-linux).
    pub async fn start_with_hosts(config: &Path, extra: &[&str], hosts: &str) -> Running {
        Running::start_resolving(config, extra, Some(hosts)).await
    }

    async fn start_resolving(config: &Path, extra: &[&str], hosts: Option<&str>) -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("herald.log");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut args: Vec<String> = [
            "run",
            "--config",
            config.to_str().expect("utf-8 path"),
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--reload-interval",
            "200ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Fast retries unless the test sets its own.
        for (flag, value) in [
            ("--retry-initial-backoff", "50ms"),
            ("--retry-max-backoff", "500ms"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut command = match hosts {
            None => Command::new(binary()),
            Some(hosts) => {
                crate::tools::require_all();
                let file = dir.path().join("hosts");
                std::fs::write(&file, format!("127.0.0.1 localhost\n{hosts}\n"))
                    .expect("write the hosts file");
                // `unshare` and `exec` keep one process id: signals reach Herald itself.
                let mut command = Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
                    .arg(&file)
                    .arg(binary());
                command
            }
        };
        command.args(&args).env("RUST_LOG", "info,herald=debug");
        let process = Process::spawn("herald", command, &log).expect("spawn herald");
        let mut running = Running {
            process,
            addr,
            admin,
            _dir: dir,
        };
        let readyz = running.url("/readyz");
        if let Err(exited) = running
            .process
            .wait_answering(&readyz, Duration::from_secs(20))
            .await
        {
            panic!(
                "herald exited ({exited}) before it was ready; log:\n{}",
                running.log()
            );
        }
        running
    }

    /// A URL on the receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        self.process.wait_log(needle, timeout).await
    }

    /// Posts an Alertmanager payload and returns the status code and body.
    pub async fn post_alerts(&self, payload: &serde_json::Value) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(self.url("/api/v1/alerts"))
            .json(payload)
            .send()
            .await
            .expect("post alerts");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.process.kill();
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The admin listener's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; fails the test if it had to be
    /// killed.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.process
            .terminate(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}
