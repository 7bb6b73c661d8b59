//! Everything the integration tests need from outside the repository, checked all at once.
//!
//! The first time a test asks for any external tool, [`require_all`] checks every tool the
//! suite uses (not only the one asked for). If anything is missing, it prints one message
//! listing all of it with the commands that install it, and exits the test binary. Cargo stops
//! at that first failing test binary, so a fresh machine meets one message, not one missing
//! tool per rerun. `hack/test` installs everything and then runs the tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Binaries that `hack/build-tools.sh` builds into [`tools_root`]`/bin`.
const BUILT_TOOLS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kubectl",
    "helm",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "pause.tar",
];

/// Commands from Debian packages, with the package that provides each.
const DEBIAN_COMMANDS: &[(&str, &str)] = &[
    ("prometheus-alertmanager", "prometheus-alertmanager"),
    ("prometheus", "prometheus"),
    ("tinyproxy", "tinyproxy-bin"),
    ("buildah", "buildah"),
    ("podman", "podman"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("pgrep", "procps"),
    ("unshare", "util-linux"),
];

/// CNI plugins the test node's pod network uses, from `containernetworking-plugins`.
pub const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];

/// Where Debian's `containernetworking-plugins` installs the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// `$HERALD_TOOLS_DIR`, else `~/.cache/herald-tools`.
pub fn tools_root() -> PathBuf {
    match std::env::var_os("HERALD_TOOLS_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/herald-tools"),
    }
}

/// `command` on `PATH`, else in `/usr/bin`, `/usr/sbin` or `/sbin`.
pub fn find_command(command: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
}

/// Checks every tool once per test binary; on the first gap, prints the whole list and exits.
pub fn require_all() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        if let Some(message) = missing_message(&tools_root()) {
            // Holding stderr's lock (one per process, whichever copy of this module runs)
            // until the exit keeps a second thread from printing the message again.
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "\n{message}");
            let _ = stderr.flush();
            std::process::exit(101);
        }
    });
}

/// The message naming every missing tool, or `None` when all are there.
pub fn missing_message(root: &Path) -> Option<String> {
    let mut lines = Vec::new();

    let bin = root.join("bin");
    let built: Vec<&str> = BUILT_TOOLS
        .iter()
        .copied()
        .filter(|name| !bin.join(name).is_file())
        .collect();
    if !built.is_empty() {
        lines.push(format!(
            "  {} (in {}): hack/build-tools.sh",
            built.join(", "),
            bin.display()
        ));
    }

    let mut packages: Vec<&str> = Vec::new();
    let mut commands: Vec<&str> = Vec::new();
    for (command, package) in DEBIAN_COMMANDS {
        if find_command(command).is_none() {
            commands.push(command);
            if !packages.contains(package) {
                packages.push(package);
            }
        }
    }
    let cni: Vec<&str> = CNI_PLUGINS
        .iter()
        .copied()
        .filter(|plugin| !Path::new(CNI_BIN_DIR).join(plugin).is_file())
        .collect();
    if !cni.is_empty() {
        commands.push("CNI plugins");
        packages.push("containernetworking-plugins");
    }
    if !packages.is_empty() {
        lines.push(format!(
            "  {}: apt-get install -y {}",
            commands.join(", "),
            packages.join(" ")
        ));
    }

    let python = root.join("py-venv/bin/python");
    if !python.is_file() {
        lines.push(format!(
            "  the standardwebhooks verifier ({}): hack/python-peers.sh (needs python3-venv)",
            python.display()
        ));
    }

    if !is_root() {
        lines.push(
            "  root: the pod tests run a kubelet, containerd and a network namespace; \
             run the tests as root"
                .to_owned(),
        );
    }

    if lines.is_empty() {
        return None;
    }
    Some(format!(
        "The integration tests need tools that are missing on this machine:\n{}\n\n\
         `hack/test` installs all of them (Debian packages, the tools built from the Go module \
         proxy into {}, the Python venv) and then runs the tests.",
        lines.join("\n"),
        root.display()
    ))
}

/// Whether this process runs as root (effective uid 0), read from `/proc/self/status`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
