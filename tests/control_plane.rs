//! Proves the test control plane works: a real etcd + kube-apiserver, reached
//! through kube-rs and through kubectl. Needs `hack/build-tools.sh` to have
//! run; a missing binary fails the tests, it never skips them.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use control_plane::ControlPlane;
use herald_testkit::control_plane;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};

fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// Runs `kubectl --kubeconfig <kubeconfig> <args>` and returns its stdout.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(control_plane::tool("kubectl")?)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .context("running kubectl")?;
    ensure!(
        output.status.success(),
        "kubectl {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).context("kubectl output is not UTF-8")
}

#[tokio::test]
async fn namespace_round_trip_through_kube_client() -> Result<()> {
    let plane = control_plane::shared();
    eprintln!("shared control plane ready after {:?}", plane.ready_after);
    let client = plane.client().await?;
    let namespaces: Api<Namespace> = Api::all(client);

    let created = namespaces
        .create(&PostParams::default(), &namespace("round-trip"))
        .await
        .context("creating namespace round-trip")?;
    assert!(created.metadata.uid.is_some(), "the server assigns a uid");

    let read = namespaces
        .get("round-trip")
        .await
        .context("reading namespace round-trip")?;
    assert_eq!(read.metadata.uid, created.metadata.uid);
    Ok(())
}

#[tokio::test]
async fn kubectl_sees_namespaces_created_through_kube() -> Result<()> {
    let plane = control_plane::shared();
    let namespaces: Api<Namespace> = Api::all(plane.client().await?);
    namespaces
        .create(&PostParams::default(), &namespace("seen-by-kubectl"))
        .await
        .context("creating namespace seen-by-kubectl")?;

    let kubeconfig = plane.kubeconfig.clone();
    let listed = tokio::task::spawn_blocking(move || {
        kubectl(&kubeconfig, &["get", "namespaces", "-o", "name"])
    })
    .await??;
    let names: Vec<&str> = listed.lines().collect();
    assert!(names.contains(&"namespace/default"), "{names:?}");
    assert!(names.contains(&"namespace/seen-by-kubectl"), "{names:?}");

    // The service-account signing key (ECDSA P-256) issues tokens.
    let kubeconfig = plane.kubeconfig.clone();
    let token = tokio::task::spawn_blocking(move || {
        kubectl(
            &kubeconfig,
            &["-n", "seen-by-kubectl", "create", "sa", "probe"],
        )?;
        kubectl(
            &kubeconfig,
            &["-n", "seen-by-kubectl", "create", "token", "probe"],
        )
    })
    .await??;
    assert!(token.starts_with("eyJ"), "not a JWT: {token}");
    Ok(())
}

#[test]
fn own_plane_stops_its_processes_and_removes_its_directory_on_drop() -> Result<()> {
    let plane = ControlPlane::start()?;
    eprintln!("own control plane ready after {:?}", plane.ready_after);
    let pids = plane.pids();
    let dir = plane.dir().to_path_buf();
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver run");
    for pid in &pids {
        assert!(Path::new(&format!("/proc/{pid}")).exists(), "{pid} runs");
    }
    let version = kubectl(&plane.kubeconfig, &["version", "-o", "json"])?;
    assert!(version.contains("v1.35.4"), "server version: {version}");

    let stopping = std::time::Instant::now();
    drop(plane);
    eprintln!("own control plane stopped in {:?}", stopping.elapsed());
    for pid in &pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists after drop"
        );
    }
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    Ok(())
}

#[test]
fn missing_binaries_fail_with_a_hint_to_build_them() -> Result<()> {
    let empty = tempfile::tempdir().context("creating an empty tools dir")?;
    let err = match ControlPlane::start_with_tools(empty.path()) {
        Ok(_) => anyhow::bail!("started without binaries"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("hack/build-tools.sh"), "{err}");
    assert!(err.contains("kube-apiserver"), "{err}");
    Ok(())
}

#[test]
fn a_crashing_apiserver_is_reported_with_its_log_tail() -> Result<()> {
    use std::os::unix::fs::{PermissionsExt, symlink};

    let bin = tempfile::tempdir().context("creating a fake tools dir")?;
    symlink(control_plane::tool("etcd")?, bin.path().join("etcd")).context("linking etcd")?;
    let fake = bin.path().join("kube-apiserver");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'fake apiserver: boom' >&2\nexit 3\n",
    )
    .context("writing a fake kube-apiserver")?;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))
        .context("making the fake kube-apiserver executable")?;

    let err = match ControlPlane::start_with_tools(bin.path()) {
        Ok(_) => anyhow::bail!("a crashing kube-apiserver started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("kube-apiserver exited during startup"),
        "{err}"
    );
    assert!(err.contains("fake apiserver: boom"), "{err}");
    // The log path in the message lies in the plane directory, removed by now.
    let log = err
        .split_whitespace()
        .find(|word| word.ends_with("kube-apiserver.log:"))
        .context("the error names the log file")?;
    let dir = Path::new(log.trim_end_matches(':'))
        .parent()
        .context("log file has a directory")?;
    assert!(!dir.exists(), "{} still exists", dir.display());
    Ok(())
}
