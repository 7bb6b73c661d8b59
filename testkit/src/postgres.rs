//! A real PostgreSQL server for integration tests: Debian's binaries (`apt-get install -y
//! postgresql`, in `/usr/lib/postgresql/VERSION/bin`), a fresh cluster made by `initdb` in a
//! temporary directory, listening on a free loopback port with its socket in that directory,
//! stopped (immediately) and removed when dropped.
//!
//! `initdb` and `pg_ctl` refuse to run as root: as root the cluster belongs to an unprivileged
//! system user made for the purpose (`herald-pg`, created with `useradd -r` when missing) and
//! the commands run through `runuser`. A missing binary is an error, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::process::free_port;
use crate::tools::is_root;

/// The unprivileged user that owns test clusters when the tests run as root.
const USER: &str = "herald-pg";

/// The directory of the PostgreSQL server binaries: `$HERALD_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` holding `initdb`; panics with the install hint when none does.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HERALD_PG_BIN").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: install them with \
             `apt-get install -y postgresql` (Debian), or set HERALD_PG_BIN to the directory \
             holding initdb and pg_ctl"
        )
    })
}

/// Creates the unprivileged user when it is missing (root only).
fn ensure_user() {
    let exists = Command::new("id")
        .arg(USER)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        let made = Command::new("useradd")
            .args(["-r", "-M", "-s", "/usr/sbin/nologin", USER])
            .output()
            .expect("run useradd");
        // Another test may have created it meanwhile (exit 9: already exists).
        assert!(
            made.status.success() || made.status.code() == Some(9),
            "useradd {USER}: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
}

/// A running PostgreSQL cluster; stopped and removed when dropped.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    as_user: bool,
    /// Extra server options (`-c name=value ...`).
    options: String,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Makes a cluster (user `herald`, trust authentication on loopback) and starts it.
    pub fn start() -> Postgres {
        Self::start_with(|_| String::new())
    }

    /// As [`Postgres::start`], serving TLS (as well as plain connections) with this
    /// certificate and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Postgres {
        Self::start_with(|postgres| {
            let cert = postgres.dir.path().join("server.crt");
            let key = postgres.dir.path().join("server.key");
            std::fs::write(&cert, cert_pem).expect("write the certificate");
            std::fs::write(&key, key_pem).expect("write the key");
            set_mode(&key, 0o600);
            if postgres.as_user {
                postgres.chown(&cert);
                postgres.chown(&key);
            }
            format!(
                "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            )
        })
    }

    fn start_with(options: impl FnOnce(&Postgres) -> String) -> Postgres {
        let bin = bin_dir();
        let as_user = is_root();
        if as_user {
            ensure_user();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut postgres = Postgres {
            bin,
            data,
            port: free_port(),
            as_user,
            options: String::new(),
            dir,
        };
        if as_user {
            set_mode(postgres.dir.path(), 0o755);
            postgres.chown(postgres.dir.path());
        }
        postgres.run_checked(
            "initdb",
            &[
                "-D",
                postgres.data.to_str().expect("utf-8 path"),
                "-A",
                "trust",
                "-U",
                "herald",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        postgres.options = options(&postgres);
        postgres.start_server();
        postgres
    }

    fn chown(&self, path: &Path) {
        let out = Command::new("chown")
            .args([&format!("{USER}:"), path.to_str().expect("utf-8 path")])
            .output()
            .expect("run chown");
        assert!(
            out.status.success(),
            "chown: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs one of the server's programs as the cluster's owner.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let path = self.bin.join(program);
        let mut command = if self.as_user {
            let mut c = Command::new("runuser");
            c.args(["-u", USER, "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", path.display()))
    }

    fn run_checked(&self, program: &str, args: &[&str]) {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} failed:\n{}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Starts the server with this cluster's options, and those of `$HERALD_PG_OPTIONS` when
    /// set (for profiling, e.g. `-c shared_preload_libraries=pg_stat_statements`).
    fn start_server(&self) {
        let extra = std::env::var("HERALD_PG_OPTIONS").unwrap_or_default();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 {} {extra}",
            self.port,
            self.dir.path().display(),
            self.options
        );
        let log = self.dir.path().join("server.log");
        self.run_checked(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("utf-8 path"),
                "-o",
                &options,
                "-l",
                log.to_str().expect("utf-8 path"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server (fast: connections are closed), as a database outage.
    pub fn stop(&self) {
        self.run_checked(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("utf-8 path"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&self) {
        self.start_server();
    }

    /// The connection string for the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://herald@127.0.0.1:{}/postgres", self.port)
    }

    /// The connection string for another database of this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://herald@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs SQL with `psql` and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "herald",
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
