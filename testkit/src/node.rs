//! A one-node Kubernetes cluster for pod tests: `hack/test-cluster.sh` starts etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, and a node (containerd + kubelet,
//! pods on a CNI bridge) in a network namespace of its own; see that script for the layout.
//!
//! Needs root and every tool of `hack/test` (a missing one stops the test binary with the
//! list, see [`crate::tools`]).
//!
//! Cleanup is `hack/test-cluster.sh down`, run on drop, or by a watchdog process when the test
//! binary exits without dropping the cluster (a shared cluster lives in a `static`): it stops
//! the processes and the pods' containers, unmounts what they mounted, and deletes the network
//! namespaces, the veth link and the CNI state.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::tools;

/// The image tag `deploy/` and the chart name by default: a locally built image under this
/// name is what they run, as written (`imagePullPolicy: IfNotPresent` finds it on the node).
pub const IMAGE: &str = "ghcr.io/herald-dev/herald:0.1.0";

/// A running cluster with one node.
pub struct Cluster {
    /// Its directory: kubeconfig, certificates, every process's log.
    pub dir: PathBuf,
    /// An admin kubeconfig (`system:masters`).
    pub kubeconfig: PathBuf,
    /// This side of the veth pair to the node: kube-apiserver listens here, and sinks bound
    /// here are reachable from pods.
    pub host_ip: Ipv4Addr,
    /// The node's name.
    pub node_name: String,
    watchdog: Option<Child>,
}

fn repo() -> &'static Path {
    crate::repo_root()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The cluster shared by the tests of one test binary, started on first use (with the
/// herald image built from this build's binary and loaded onto the node). Stopped by its
/// watchdog when the test binary exits.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match SHARED.get_or_init(|| {
        let cluster = Cluster::start()?;
        cluster.load_herald_image()?;
        Ok(cluster)
    }) {
        Ok(cluster) => cluster,
        Err(e) => panic!("the test cluster failed to start: {e}"),
    }
}

impl Cluster {
    /// Starts a cluster and waits until its node is Ready (`hack/test-cluster.sh up`).
    pub fn start() -> Result<Cluster, String> {
        tools::require_all();
        let dir = tempfile::Builder::new()
            .prefix("herald-cluster-")
            .tempdir()
            .map_err(|e| format!("creating the cluster directory: {e}"))?
            .keep();
        let script = repo().join("hack/test-cluster.sh");
        // The watchdog waits for its stdin to close (this process exiting, or drop), then
        // tears the cluster down. It runs in a session of its own and ignores the terminal's
        // signals, so that Ctrl-C or a signal to the whole process group (`timeout`) leaves
        // it alive to clean up.
        let watchdog = Command::new("setsid")
            .arg("sh")
            .arg("-c")
            .arg(r#"trap '' INT TERM HUP; cat >/dev/null; exec "$0" down "$1""#)
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning the cluster watchdog: {e}"))?;
        let mut cluster = Cluster {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            host_ip: Ipv4Addr::UNSPECIFIED,
            node_name: String::new(),
            watchdog: Some(watchdog),
        };
        let up = Command::new(&script)
            .arg("up")
            .arg(&cluster.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !up.status.success() {
            return Err(format!(
                "{} up failed ({}):\n{}",
                script.display(),
                up.status,
                text(&up.stderr)
            ));
        }
        let env = std::fs::read_to_string(cluster.dir.join("env"))
            .map_err(|e| format!("reading the cluster's env file: {e}"))?;
        let vars: BTreeMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
        cluster.host_ip = vars
            .get("HOST_IP")
            .and_then(|ip| ip.parse().ok())
            .ok_or("HOST_IP missing from the cluster's env file")?;
        cluster.node_name = vars
            .get("NODE_NAME")
            .map(|n| n.to_string())
            .ok_or("NODE_NAME missing from the cluster's env file")?;
        Ok(cluster)
    }

    /// Builds the herald image from this build's binary with `hack/build-image.sh` (the
    /// repository's Dockerfile, offline), tags it [`IMAGE`] and imports it into the node's
    /// containerd.
    pub fn load_herald_image(&self) -> Result<(), String> {
        let archive = self.dir.join("herald-image.tar");
        let build = Command::new(repo().join("hack/build-image.sh"))
            .arg("--binary")
            .arg(crate::cli::binary())
            .args(["--tag", IMAGE])
            .arg("--archive")
            .arg(&archive)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running hack/build-image.sh: {e}"))?;
        if !build.status.success() {
            return Err(format!(
                "hack/build-image.sh failed ({}):\n{}",
                build.status,
                text(&build.stderr)
            ));
        }
        let import = self.ctr(&["images", "import"], Some(&archive));
        let _ = std::fs::remove_file(&archive);
        if !import.status.success() {
            return Err(format!(
                "ctr images import failed: {}",
                text(&import.stderr)
            ));
        }
        Ok(())
    }

    /// Runs `ctr` against the node's containerd (namespace `k8s.io`), with `path` as the
    /// last argument when given.
    pub fn ctr(&self, args: &[&str], path: Option<&Path>) -> Output {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["--namespace", "k8s.io"])
            .args(args);
        if let Some(path) = path {
            cmd.arg(path);
        }
        cmd.stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running ctr: {e}"))
    }

    /// Runs a tool of `hack/build-tools.sh` (`kubectl`, `helm`) against this cluster, in the
    /// repository, and returns its output whatever the exit status.
    pub fn run(&self, tool: &str, args: &[&str]) -> Output {
        let bin = tools::tools_root().join("bin").join(tool);
        Command::new(&bin)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
    }

    /// Runs `tool args` and returns its stdout; panics with its stderr unless it succeeds.
    pub fn ok(&self, tool: &str, args: &[&str]) -> String {
        let out = self.run(tool, args);
        assert!(
            out.status.success(),
            "{tool} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `kubectl args`; see [`Cluster::ok`].
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.ok("kubectl", args)
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl get output: {e}\n{out}"))
    }

    /// Applies a manifest given as text (`kubectl apply -f -`).
    pub fn apply(&self, manifest: &str) {
        let file = tempfile::NamedTempFile::new().expect("manifest file");
        std::fs::write(file.path(), manifest).expect("writing the manifest");
        let path = file.path().to_str().expect("UTF-8 path");
        self.kubectl(&["apply", "-f", path]);
    }

    /// A static `hostPath` PersistentVolume of storage class `class` backed by a directory of
    /// this cluster owned by uid/gid 65532 (Herald's user), for claims of that class (an empty
    /// class: claims that name the volume or ask for no class).
    pub fn hostpath_volume(&self, name: &str, class: &str, size: &str) -> PathBuf {
        self.hostpath_volume_reserved(name, class, size, None)
    }

    /// A [`Cluster::hostpath_volume`] without a class, reserved for the claim `claim` of
    /// `namespace` (its `claimRef`), such as a StatefulSet's `data-herald-0`: only that claim
    /// binds it, whichever other volumes and claims exist. Named `<namespace>-<claim>`.
    pub fn volume_for_claim(&self, namespace: &str, claim: &str, size: &str) -> PathBuf {
        let name = format!("{namespace}-{claim}");
        self.hostpath_volume_reserved(&name, "", size, Some((namespace, claim)))
    }

    fn hostpath_volume_reserved(
        &self,
        name: &str,
        class: &str,
        size: &str,
        claim: Option<(&str, &str)>,
    ) -> PathBuf {
        let path = self.dir.join("volumes").join(name);
        std::fs::create_dir_all(&path).expect("volume directory");
        let chown = Command::new("chown")
            .arg("65532:65532")
            .arg(&path)
            .status()
            .expect("chown");
        assert!(chown.success(), "chown 65532 {}", path.display());
        let mut volume = serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": class,
                "hostPath": {"path": path, "type": "Directory"},
            },
        });
        if let Some((namespace, claim)) = claim {
            volume["spec"]["claimRef"] = serde_json::json!({
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": namespace,
                "name": claim,
            });
        }
        self.apply(&volume.to_string());
        path
    }

    /// The pods of `namespace` matching `selector`, as JSON items.
    pub fn pods(&self, namespace: &str, selector: &str) -> Vec<Value> {
        self.get_json(&["pods", "-n", namespace, "-l", selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits (bounded) until exactly `count` pods match, all Running and Ready and none
    /// terminating; returns them. Fails with their states and the kubelet's log tail.
    pub fn wait_ready_pods(
        &self,
        namespace: &str,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let pods = self.pods(namespace, selector);
            let ready = pods.iter().all(|p| {
                p["metadata"]["deletionTimestamp"].is_null()
                    && p["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
            });
            if pods.len() == count && ready {
                return pods;
            }
            if Instant::now() >= deadline {
                let states: Vec<String> = pods
                    .iter()
                    .map(|p| {
                        format!(
                            "{}: {} {}",
                            p["metadata"]["name"],
                            p["status"]["phase"],
                            p["status"]["containerStatuses"]
                        )
                    })
                    .collect();
                panic!(
                    "{count} ready pods matching {selector} in {namespace} not there after \
                     {timeout:?}; pods:\n{}\nevents:\n{}\nkubelet log tail:\n{}",
                    states.join("\n"),
                    text(
                        &self
                            .run("kubectl", &["get", "events", "-n", namespace])
                            .stdout
                    ),
                    self.log_tail("kubelet.log", 30)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The last `lines` lines of one of the cluster's logs.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The host process id of the container `container` of pod `pod` (the node runs on this
    /// machine, so its processes can be inspected in /proc).
    pub fn container_pid(&self, namespace: &str, pod: &str, container: &str) -> u32 {
        let pod_json = self.get_json(&["pod", "-n", namespace, pod]);
        let id = pod_json["status"]["containerStatuses"]
            .as_array()
            .and_then(|statuses| statuses.iter().find(|s| s["name"] == container))
            .and_then(|s| s["containerID"].as_str())
            .and_then(|id| id.strip_prefix("containerd://"))
            .unwrap_or_else(|| panic!("no containerd id for {container} in {pod}: {pod_json}"))
            .to_owned();
        let out = self.ctr(&["tasks", "ls"], None);
        text(&out.stdout)
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(id.as_str()))
                    .then(|| fields.next().and_then(|pid| pid.parse().ok()))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no task for container {id}:\n{}", text(&out.stdout)))
    }

    fn teardown(&mut self) {
        // Stop the watchdog first so that only this teardown runs.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = Command::new(repo().join("hack/test-cluster.sh"))
            .arg("down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}
