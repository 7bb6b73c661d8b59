//! The one guard for every real process the tests and the benchmark start, free loopback
//! ports, and the waits around them: a log to appear, an HTTP endpoint to answer.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Lines of a process's log shown when a test fails while the process runs.
const LOG_LINES_ON_PANIC: usize = 60;

/// A child process with its stdout and stderr in a log file. Dropping it stops the process
/// (SIGKILL, or SIGTERM first with [`Process::with_stop_grace`]) and reaps it; when the thread
/// is panicking, the last lines of the log are printed first, so a failing test shows what
/// the process saw.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    started: Instant,
    stop_grace: Duration,
}

impl Process {
    /// Spawns `cmd` (stdin closed) with stdout and stderr written to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Process> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {name} ({})", cmd.get_program().display()))?;
        Ok(Process {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            started,
            stop_grace: Duration::ZERO,
        })
    }

    /// On drop, SIGTERM first and up to `grace` to exit before SIGKILL (default: SIGKILL).
    pub fn with_stop_grace(mut self, grace: Duration) -> Process {
        self.stop_grace = grace;
        self
    }

    /// The name given at spawn, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// When it was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// The exit status, when the process has exited (reaping it).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Fails, with the end of the log, when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.exit_status() {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.tail(30)
            );
        }
        Ok(())
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`, ...) with `kill`; panics if it fails.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// SIGTERM, then up to `grace` for the process to exit. The exit status, or an error
    /// when it had to be killed (SIGKILL) after `grace`; either way the process is reaped.
    /// A zero `grace` kills at once.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} was already stopped", self.name);
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        if !grace.is_zero() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(status)) => return Ok(status),
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("{} did not exit within {grace:?} of SIGTERM", self.name)
    }

    /// [`Process::terminate`], ignoring how it ended.
    pub fn stop(&mut self, grace: Duration) {
        let _ = self.terminate(grace);
    }

    /// SIGKILL at once: no shutdown code runs.
    pub fn kill(&mut self) {
        self.stop(Duration::ZERO);
    }

    /// CPU seconds (user + system) used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(0.0)
    }

    /// `(VmRSS, VmHWM)` in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        memory_kib(self.pid()).unwrap_or((0, 0))
    }

    /// Waits (bounded) until the log contains `needle`; returns the log.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        wait_for_log(&self.name, || self.log(), needle, timeout).await
    }

    /// Polls `GET url` until it answers 2xx. `Err` with the exit status when the process exits
    /// first (a caller may start it again); fails the test, with the end of the log, when it
    /// still runs but has not answered within `timeout`.
    pub async fn wait_answering(&mut self, url: &str, timeout: Duration) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("an HTTP client");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Err(status.to_string());
            }
            if let Ok(response) = client.get(url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer {url} within {timeout:?}; last lines of its log:\n{}",
                self.name,
                self.tail(LOG_LINES_ON_PANIC)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `GET http://addr{path}` until it answers 200, at most `timeout`; returns the time
    /// from spawning until then. Fails at once when the process exits.
    pub async fn wait_http_ok(
        &mut self,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if http_get_ok(addr, path).await {
                return Ok(self.started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready on {addr}{path} after {timeout:?}; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "--- {} log (last {LOG_LINES_ON_PANIC} lines) ---\n{}",
                self.name,
                self.tail(LOG_LINES_ON_PANIC)
            );
        }
        self.stop(self.stop_grace);
    }
}

/// A free loopback port (bound, then released: a process started on it may, rarely, find it
/// taken, which is why the harnesses that start servers retry on another port).
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free loopback ports: every listener is held until all are picked.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port"))
        .collect();
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().expect("a bound port").port();
    }
    ports
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

/// One `GET` with a short timeout; true on 200.
pub async fn http_get_ok(addr: &str, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// One `GET`; the body of a 200 answer.
pub async fn http_get_body(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let ok = head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200");
        ok.then(|| body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// `(VmRSS, VmHWM)` of a process, in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
