//! A real test control plane: etcd and kube-apiserver on loopback, the way
//! controller-runtime's envtest does it.
//!
//! The binaries come from `hack/build-tools.sh`, which builds them into
//! `$HERALD_TOOLS_DIR/bin` (default `~/.cache/herald-tools/bin`). A missing
//! binary is an error, never a skip.
//!
//! There is no kube-controller-manager: no namespace finalizer, no garbage
//! collection, no ServiceAccount token controller. Tests create what they
//! need and do not wait for cascading deletes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::process::{Process, free_ports};
use crate::tools;

/// How long kube-apiserver may take to answer `/readyz` with `ok`.
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long etcd may take to answer `/health`.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long kube-apiserver gets to exit after SIGTERM before SIGKILL.
const APISERVER_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long etcd gets to exit after SIGTERM before SIGKILL.
const ETCD_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of a process log quoted in a startup error.
const LOG_TAIL_LINES: usize = 40;

/// A running etcd + kube-apiserver pair on loopback, with an admin kubeconfig.
///
/// Dropping it stops both processes (SIGTERM, then SIGKILL after a bounded
/// wait) and removes its temporary directory. If the test process dies
/// without dropping it (e.g. the plane lives in a `static`, see [`shared`]),
/// a watchdog process kills both and removes the directory.
pub struct ControlPlane {
    /// Path of an admin kubeconfig (`system:masters`) for this plane.
    pub kubeconfig: PathBuf,
    /// The API server URL, `https://127.0.0.1:<port>`.
    pub server_url: String,
    /// Time from spawning etcd until kube-apiserver's `/readyz` said `ok`.
    pub ready_after: Duration,
    // Field order matters: processes stop before the directory is removed.
    processes: Processes,
    dir: tempfile::TempDir,
}

/// The plane shared by all tests of one test binary, started on first use.
///
/// Each test must build its own client with [`ControlPlane::client`]: a
/// `kube::Client` is tied to the tokio runtime that created it, and every
/// `#[tokio::test]` has its own runtime. Since statics are never dropped,
/// the processes are stopped by the watchdog when the test binary exits.
///
/// Panics with the startup error (in every test that asks) if the plane
/// cannot start.
pub fn shared() -> &'static ControlPlane {
    static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    match SHARED.get_or_init(|| ControlPlane::start().map_err(|e| format!("{e:#}"))) {
        Ok(plane) => plane,
        Err(e) => panic!("the shared test control plane failed to start: {e}"),
    }
}

/// The directory holding the tool binaries: `$HERALD_TOOLS_DIR/bin`, or
/// `~/.cache/herald-tools/bin` when `HERALD_TOOLS_DIR` is unset. Checks every tool the
/// suite needs first (see [`tools::require_all`]).
pub fn tools_bin_dir() -> Result<PathBuf> {
    tools::require_all();
    Ok(tools::tools_root().join("bin"))
}

/// The path of tool `name` (`kube-apiserver`, `kubectl`, `etcd`, `helm`) in `bin_dir`,
/// or an error telling to run `hack/build-tools.sh` when it is missing.
pub fn tool_in(bin_dir: &Path, name: &str) -> Result<PathBuf> {
    let path = bin_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{name} not found at {}: run hack/build-tools.sh to build the test tools \
             (into $HERALD_TOOLS_DIR, default ~/.cache/herald-tools)",
            path.display()
        )
    }
}

/// The path of tool `name` in [`tools_bin_dir`]; see [`tool_in`].
pub fn tool(name: &str) -> Result<PathBuf> {
    tool_in(&tools_bin_dir()?, name)
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver from [`tools_bin_dir`] and waits until
    /// the API server is ready (at most 60 s).
    ///
    /// Blocking; may be called from inside or outside a tokio runtime.
    pub fn start() -> Result<ControlPlane> {
        Self::start_with_tools(&tools_bin_dir()?)
    }

    /// Like [`ControlPlane::start`], with the binaries taken from `bin_dir`.
    pub fn start_with_tools(bin_dir: &Path) -> Result<ControlPlane> {
        let began = Instant::now();
        let apiserver_bin = tool_in(bin_dir, "kube-apiserver")?;
        let etcd_bin = tool_in(bin_dir, "etcd")?;

        let dir = tempfile::Builder::new()
            .prefix("herald-control-plane-")
            .tempdir()
            .context("creating the control plane's temporary directory")?;
        let d = dir.path();
        let pki = Pki::generate().context("generating certificates")?;
        pki.write(d).context("writing certificates")?;

        let [etcd_port, etcd_peer_port, api_port] = free_ports();
        let mut processes = Processes::start_watchdog(d)?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd_data = d.join("etcd-data");
        let mut etcd = Command::new(&etcd_bin);
        etcd.arg("--data-dir")
            .arg(&etcd_data)
            .args(["--name", "herald-test"])
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{etcd_peer_port}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{etcd_peer_port}"))
            .arg("--initial-cluster")
            .arg(format!("herald-test=http://127.0.0.1:{etcd_peer_port}"))
            .arg("--unsafe-no-fsync");
        let etcd_log = d.join("etcd.log");
        processes.etcd = Some(processes.spawn(etcd, &etcd_log, "etcd")?);

        let health_url = format!("{etcd_url}/health");
        wait_ready(processes.etcd.as_mut(), ETCD_READY_TIMEOUT, || {
            probe_etcd(&health_url)
        })?;

        let server_url = format!("https://127.0.0.1:{api_port}");
        let path = |name: &str| d.join(name);
        let mut apiserver = Command::new(&apiserver_bin);
        apiserver
            .args(["--etcd-servers", &etcd_url])
            .arg("--cert-dir")
            .arg(d)
            .arg("--tls-cert-file")
            .arg(path("apiserver.crt"))
            .arg("--tls-private-key-file")
            .arg(path("apiserver.key"))
            .args(["--secure-port", &api_port.to_string()])
            .args(["--bind-address", "127.0.0.1"])
            .args(["--advertise-address", "127.0.0.1"])
            .args(["--service-cluster-ip-range", "10.0.0.0/24"])
            .arg("--allow-privileged=true")
            .args(["--disable-admission-plugins", "ServiceAccount"])
            .args(["--authorization-mode", "RBAC"])
            .arg("--service-account-issuer")
            .arg(format!("{server_url}/"))
            .arg("--service-account-key-file")
            .arg(path("sa.pub"))
            .arg("--service-account-signing-key-file")
            .arg(path("sa.key"))
            .arg("--client-ca-file")
            .arg(path("ca.crt"));
        let apiserver_log = d.join("kube-apiserver.log");
        processes.apiserver = Some(processes.spawn(apiserver, &apiserver_log, "kube-apiserver")?);

        let readyz = ReadyzProbe::new(&pki, &server_url)?;
        wait_ready(
            processes.apiserver.as_mut(),
            APISERVER_READY_TIMEOUT,
            || readyz.probe(),
        )?;

        let kubeconfig = d.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server_url, d)?;

        Ok(ControlPlane {
            kubeconfig,
            server_url,
            ready_after: began.elapsed(),
            processes,
            dir,
        })
    }

    /// A `kube::Client` for this plane, authenticated as the admin user
    /// (`system:masters`). Build one per test (per tokio runtime).
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading kubeconfig {}", self.kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .context("loading the control plane kubeconfig")?;
        kube::Client::try_from(config).context("building a kube client for the control plane")
    }

    /// The plane's temporary directory: certificates, kubeconfig, etcd data
    /// and the logs `etcd.log` and `kube-apiserver.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process ids of etcd and kube-apiserver, in that order.
    pub fn pids(&self) -> Vec<u32> {
        [&self.processes.etcd, &self.processes.apiserver]
            .into_iter()
            .flatten()
            .map(Process::pid)
            .collect()
    }
}

/// Child processes of a plane, stopped on drop. A watchdog shell learns each
/// process id on its stdin; when the test process exits without dropping
/// this (its stdin closes), it kills them and removes the plane directory.
struct Processes {
    watchdog: Option<Child>,
    etcd: Option<Process>,
    apiserver: Option<Process>,
}

impl Processes {
    fn start_watchdog(dir: &Path) -> Result<Processes> {
        // Ignores the terminal's signals so that it still cleans up after Ctrl-C.
        const SCRIPT: &str = r#"trap '' INT TERM HUP
pids=
while read -r pid; do pids="$pids $pid"; done
if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null; fi
rm -rf "$1""#;
        let watchdog = Command::new("sh")
            .args(["-c", SCRIPT, "herald-control-plane-watchdog"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the control plane watchdog (sh)")?;
        Ok(Processes {
            watchdog: Some(watchdog),
            etcd: None,
            apiserver: None,
        })
    }

    /// Spawns `cmd` with stdout and stderr in `log`, and registers its pid with the
    /// watchdog.
    fn spawn(&mut self, cmd: Command, log: &Path, name: &str) -> Result<Process> {
        let mut process = Process::spawn(name, cmd, log)?;
        let registered = self
            .watchdog
            .as_mut()
            .and_then(|w| w.stdin.as_mut())
            .context("the watchdog has no stdin")
            .and_then(|stdin| {
                writeln!(stdin, "{}", process.pid()).context("telling the watchdog a pid")
            });
        if let Err(e) = registered {
            process.kill();
            return Err(e);
        }
        Ok(process)
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // Stop the watchdog first, so it never signals a reaped (reusable) pid.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.stop(APISERVER_STOP_TIMEOUT);
        }
        if let Some(mut etcd) = self.etcd.take() {
            etcd.stop(ETCD_STOP_TIMEOUT);
        }
    }
}

/// Polls `probe` every 100 ms until it returns `Ok(true)`, failing when the
/// process exits or `timeout` passes; errors quote the tail of its log.
fn wait_ready(
    process: Option<&mut Process>,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let process = process.context("the process to wait for was not started")?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exit_status() {
            bail!(
                "{} exited during startup ({status}); last lines of {}:\n{}",
                process.name(),
                process.log_path().display(),
                process.tail(LOG_TAIL_LINES)
            );
        }
        let last = match probe() {
            Ok(true) => return Ok(()),
            Ok(false) => "not ready".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{} not ready after {timeout:?} (last probe: {last}); last lines of {}:\n{}",
                process.name(),
                process.log_path().display(),
                process.tail(LOG_TAIL_LINES)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One plain HTTP/1.0 `GET /health` to etcd; ready when it reports health.
fn probe_etcd(url: &str) -> Result<bool> {
    use std::io::Read;
    let addr = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .context("etcd health url")?;
    let mut stream = std::net::TcpStream::connect(addr).context("connecting to etcd")?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.starts_with("HTTP/1.") && response.contains("\"health\":\"true\""))
}

/// `GET /readyz` over TLS with the admin client certificate. Runs reqwest on
/// its own thread and runtime, so it works whether or not the caller is
/// inside a tokio runtime.
struct ReadyzProbe {
    url: String,
    client: reqwest::Client,
}

impl ReadyzProbe {
    fn new(pki: &Pki, server_url: &str) -> Result<ReadyzProbe> {
        let ca =
            reqwest::Certificate::from_pem(pki.ca_cert.as_bytes()).context("CA for reqwest")?;
        let identity =
            reqwest::Identity::from_pem(format!("{}{}", pki.admin_cert, pki.admin_key).as_bytes())
                .context("admin identity for reqwest")?;
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(identity)
            .timeout(Duration::from_secs(5))
            // Each probe runs on a fresh runtime: never reuse a connection.
            .pool_max_idle_per_host(0)
            .build()
            .context("building the readiness HTTP client")?;
        Ok(ReadyzProbe {
            url: format!("{server_url}/readyz"),
            client,
        })
    }

    fn probe(&self) -> Result<bool> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building a runtime for the readiness probe")?;
                rt.block_on(async {
                    let response = self.client.get(&self.url).send().await?;
                    let ok = response.status().is_success();
                    let body = response.text().await?;
                    Ok(ok && body.trim() == "ok")
                })
            })
            .join()
            .map_err(|_| anyhow!("the readiness probe thread panicked"))?
        })
    }
}

/// Certificates and keys for one plane, PEM-encoded.
struct Pki {
    ca_cert: String,
    serving_cert: String,
    serving_key: String,
    admin_cert: String,
    admin_key: String,
    sa_key: String,
    sa_pub: String,
}

impl Pki {
    /// An ECDSA P-256 CA; a serving certificate for localhost/127.0.0.1; an
    /// admin client certificate (CN=admin, O=system:masters); an ECDSA P-256
    /// service-account signing key pair.
    fn generate() -> Result<Pki> {
        let alg = &PKCS_ECDSA_P256_SHA256;

        let ca_key = KeyPair::generate_for(alg)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::CommonName, "herald-test-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;

        let serving_key = KeyPair::generate_for(alg)?;
        let mut serving = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        serving.distinguished_name = rcgen::DistinguishedName::new();
        serving
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.use_authority_key_identifier_extension = true;
        let serving_cert = serving.signed_by(&serving_key, &ca_cert, &ca_key)?;

        let admin_key = KeyPair::generate_for(alg)?;
        let mut admin = CertificateParams::default();
        admin.distinguished_name = rcgen::DistinguishedName::new();
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        admin.use_authority_key_identifier_extension = true;
        let admin_cert = admin.signed_by(&admin_key, &ca_cert, &ca_key)?;

        let sa = KeyPair::generate_for(alg)?;

        Ok(Pki {
            ca_cert: ca_cert.pem(),
            serving_cert: serving_cert.pem(),
            serving_key: serving_key.serialize_pem(),
            admin_cert: admin_cert.pem(),
            admin_key: admin_key.serialize_pem(),
            sa_key: sa.serialize_pem(),
            sa_pub: sa.public_key_pem(),
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        for (name, pem) in [
            ("ca.crt", &self.ca_cert),
            ("apiserver.crt", &self.serving_cert),
            ("apiserver.key", &self.serving_key),
            ("admin.crt", &self.admin_cert),
            ("admin.key", &self.admin_key),
            ("sa.key", &self.sa_key),
            ("sa.pub", &self.sa_pub),
        ] {
            let path = dir.join(name);
            fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// Writes an admin kubeconfig pointing at the certificate files in `dir`
/// (as JSON, which is valid YAML and quotes any path safely).
fn write_kubeconfig(path: &Path, server_url: &str, dir: &Path) -> Result<()> {
    let file = |name: &str| -> Result<String> {
        let path = dir.join(name);
        path.to_str()
            .map(str::to_owned)
            .with_context(|| format!("{} is not UTF-8", path.display()))
    };
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "herald-test",
            "cluster": {
                "server": server_url,
                "certificate-authority": file("ca.crt")?,
            },
        }],
        "users": [{
            "name": "admin",
            "user": {
                "client-certificate": file("admin.crt")?,
                "client-key": file("admin.key")?,
            },
        }],
        "contexts": [{
            "name": "herald-test",
            "context": { "cluster": "herald-test", "user": "admin" },
        }],
        "current-context": "herald-test",
    });
    let text = serde_json::to_vec_pretty(&kubeconfig).context("serialising the kubeconfig")?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
