//! Scale with a real API server: etcd and kube-apiserver from the project's test harness
//! (`herald_testkit::control_plane`), Herald's CRDs, N Webhooks with N NotificationConditions,
//! and `herald controller` started on them: time until `/readyz` (the initial sync), memory,
//! and the same alert load as the throughput runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;

pub use herald_testkit::control_plane::{self, ControlPlane};
use herald_testkit::process::{Process, free_port, http_get_ok};

use crate::fixture::team_of;
use crate::procs::STOP_GRACE;

/// The namespace the benchmark's objects live in (the controller's own and cluster namespace).
pub const NAMESPACE: &str = "herald-bench";

/// Creates requests in flight at once while loading objects.
const CREATE_CONCURRENCY: usize = 32;

/// The repository root (where `crds/` is).
pub fn repo_root() -> PathBuf {
    herald_testkit::repo_root().to_path_buf()
}

/// Starts the plane, installs the CRDs and creates the namespace.
pub async fn start_plane() -> Result<(ControlPlane, kube::Client)> {
    let plane = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .context("control plane thread")??;
    let kubectl = control_plane::tool("kubectl")?;
    let crds = repo_root().join("crds/herald.yaml");
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&plane.kubeconfig)
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    run(&[
        "apply",
        "--server-side",
        "-f",
        crds.to_str().context("path")?,
    ])?;
    run(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/webhooks.herald.dev",
        "crd/notificationconditions.herald.dev",
    ])?;
    run(&["create", "namespace", NAMESPACE])?;
    let client = plane.client().await?;
    Ok((plane, client))
}

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("herald.dev", "v1alpha1", kind))
}

/// Creates webhooks `wh-{from}` .. `wh-{to-1}` and their conditions (the same shapes as the
/// throughput runs' manifests); returns the time it took.
pub async fn create_objects(
    client: &kube::Client,
    from: usize,
    to: usize,
    sink: &str,
) -> Result<Duration> {
    let started = Instant::now();
    let webhooks: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NAMESPACE, &resource("Webhook"));
    let conditions: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NAMESPACE,
        &resource("NotificationCondition"),
    );
    let objects = (from..to).flat_map(|i| {
        let team = team_of(i);
        let condition: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1",
            "kind": "NotificationCondition",
            "metadata": {"name": format!("cond-{i}"), "namespace": NAMESPACE},
            "spec": crate::fixture::condition_spec(team),
        }))
        .expect("condition");
        let webhook: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1",
            "kind": "Webhook",
            "metadata": {"name": format!("wh-{i}"), "namespace": NAMESPACE,
                         "labels": {"team": format!("team-{team}")}},
            "spec": {"url": format!("{sink}/wh-{i}"), "conditions": [format!("cond-{i}")]},
        }))
        .expect("webhook");
        [(true, condition), (false, webhook)]
    });
    let results: Vec<Result<()>> = futures::stream::iter(objects)
        .map(|(is_condition, object)| {
            let api = if is_condition { &conditions } else { &webhooks };
            async move {
                let mut attempt = 0;
                loop {
                    match api.create(&PostParams::default(), &object).await {
                        Ok(_) => return Ok(()),
                        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
                        Err(e) if attempt < 5 => {
                            attempt += 1;
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context("creating an object")),
                    }
                }
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(started.elapsed())
}

/// A controller that was started, synced or not.
pub struct Started {
    pub proc: Process,
    pub addr: String,
    /// Time from spawn until `/readyz` answered, if it did within the limit.
    pub ready_after: Option<Duration>,
    /// `(seconds since spawn, webhooks in the table, of which ready)`, every few seconds.
    pub progress: Vec<(f64, u64, u64)>,
}

/// `herald controller` on the plane, its namespace and cluster namespace [`NAMESPACE`]; waits
/// at most `limit` for `/readyz` (the initial sync), noting the table's progress meanwhile.
pub async fn start_controller(
    herald: &Path,
    plane: &ControlPlane,
    dir: &Path,
    webhooks: usize,
    limit: Duration,
) -> Result<Started> {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(herald);
    cmd.arg("controller")
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args(["--listen", &addr, "--admin-listen", "127.0.0.1:0"])
        // The benchmark's sinks listen on loopback, which a controller refuses by default.
        .arg("--allow-loopback")
        .args(["--namespace", NAMESPACE, "--cluster-namespace", NAMESPACE])
        .env(
            "RUST_LOG",
            std::env::var("HERALD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let mut proc = Process::spawn(
        "herald controller",
        cmd,
        &dir.join(format!("controller-{webhooks}.log")),
    )?
    .with_stop_grace(STOP_GRACE);
    let mut progress = Vec::new();
    let mut next_sample = Instant::now();
    let ready_after = loop {
        proc.check_alive()?;
        if http_get_ok(&addr, "/readyz").await {
            break Some(proc.started().elapsed());
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(5);
            if let Some((total, ready)) = crate::procs::webhook_counts(&addr).await {
                progress.push((proc.started().elapsed().as_secs_f64(), total, ready));
            }
        }
        if proc.started().elapsed() >= limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some((total, ready)) = crate::procs::webhook_counts(&addr).await {
        progress.push((proc.started().elapsed().as_secs_f64(), total, ready));
    }
    if ready_after.is_some() {
        crate::procs::expect_ready_webhooks(&mut proc, &addr, webhooks, Duration::from_secs(30))
            .await?;
    }
    Ok(Started {
        proc,
        addr,
        ready_after,
        progress,
    })
}
