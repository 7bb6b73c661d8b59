//! Runs the `herald` binary as a real process for end-to-end tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The built `herald` binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

/// Runs a `herald` command to completion.
pub fn herald(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run herald")
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A `herald run` process; killed when dropped.
pub struct Running {
    child: Child,
    /// Receiver address.
    pub addr: SocketAddr,
    /// Admin listener address.
    pub admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Starts `herald run --config DIR` with fast reloads and retries, and waits for `/readyz`.
    pub async fn start(config: &Path, extra: &[&str]) -> Running {
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
            "--retry-initial-backoff",
            "50ms",
            "--retry-max-backoff",
            "500ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(binary())
            .args(&args)
            .env("RUST_LOG", "info,herald=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn herald");
        let running = Running {
            child,
            addr,
            admin,
            log,
            _dir: dir,
        };
        running.wait_ready().await;
        running
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        while Instant::now() < deadline {
            if let Ok(r) = client.get(self.url("/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("herald did not become ready; log:\n{}", self.log());
    }

    /// A URL on the receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        wait_for_log("herald", || self.log(), needle, timeout).await
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin listener's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "herald did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until a process's log, as `read` returns it, contains `needle`; returns the
/// log, or fails the test with it.
pub async fn wait_for_log(
    what: &str,
    read: impl Fn() -> String,
    needle: &str,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = read();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{what} log never contained {needle:?} within {timeout:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
