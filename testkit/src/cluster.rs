//! Kubernetes helpers for controller tests: the shared control plane with Herald's CRDs
//! installed, namespaces, kubectl, and `herald controller` processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use herald::crd::Webhook;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::control_plane::{self, ControlPlane};
use crate::process::{Process, free_port};
use crate::repo_root;

/// The ServiceAccount that `deploy/` grants Herald's permissions to.
pub const SERVICE_ACCOUNT: &str = "system:serviceaccount:herald:herald";

/// A kubeconfig for the shared plane that impersonates Herald's ServiceAccount, so controllers
/// under test run with exactly the permissions `deploy/rbac.yaml` grants.
pub fn service_account_kubeconfig() -> PathBuf {
    let plane = plane();
    plane.dir().join("herald-sa.kubeconfig")
}

/// The shared control plane, with `crds/herald.yaml` applied and established and Herald's
/// namespace, ServiceAccount and RBAC from `deploy/` in place.
pub fn plane() -> &'static ControlPlane {
    static CRDS: Once = Once::new();
    let plane = control_plane::shared();
    CRDS.call_once(|| {
        let deploy = repo_root().join("deploy");
        for file in ["00-namespace.yaml", "serviceaccount.yaml", "rbac.yaml"] {
            let path = deploy.join(file);
            let out = kubectl(&["apply", "--server-side", "-f", path.to_str().expect("path")]);
            assert!(
                out.status.success(),
                "applying {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut kubeconfig: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&plane.kubeconfig).expect("kubeconfig"))
                .expect("the plane's kubeconfig is JSON");
        kubeconfig["users"][0]["user"]["as"] = serde_json::json!(SERVICE_ACCOUNT);
        std::fs::write(
            plane.dir().join("herald-sa.kubeconfig"),
            kubeconfig.to_string(),
        )
        .expect("writing the ServiceAccount kubeconfig");
        let crds = repo_root().join("crds/herald.yaml");
        let out = kubectl(&["apply", "--server-side", "-f", crds.to_str().expect("path")]);
        assert!(
            out.status.success(),
            "installing CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/webhooks.herald.dev",
            "crd/notificationconditions.herald.dev",
        ]);
        assert!(
            out.status.success(),
            "CRDs not established: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    plane
}

/// Runs kubectl against the shared plane.
pub fn kubectl(args: &[&str]) -> Output {
    kubectl_stdin(args, None)
}

/// Runs kubectl against the shared plane with `stdin` as input.
pub fn kubectl_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let plane = control_plane::shared();
    let mut child = Command::new(control_plane::tool("kubectl").expect("kubectl"))
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("kubectl output")
}

/// Applies YAML with kubectl and asserts success.
pub fn apply(yaml: &str) {
    let out = kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
    assert!(
        out.status.success(),
        "kubectl apply failed: {}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A kube client for the shared plane (one per test runtime).
pub async fn client() -> kube::Client {
    plane().client().await.expect("kube client")
}

/// Creates a namespace.
pub async fn namespace(client: &kube::Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// Waits (bounded) until a Webhook satisfies `check`, returning it.
pub async fn wait_webhook(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Webhook) -> bool,
) -> Webhook {
    let api: Api<Webhook> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let current = api.get_opt(name).await.expect("get webhook");
        if let Some(webhook) = current.as_ref()
            && check(webhook)
        {
            return webhook.clone();
        }
        assert!(
            Instant::now() < deadline,
            "webhook {namespace}/{name} never became {what}; last seen: {:#?}",
            current.and_then(|w| w.status)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Ready condition of a Webhook as (status, reason).
pub fn ready(webhook: &Webhook) -> Option<(String, String)> {
    webhook
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// The message of a Webhook's Ready condition (empty without one).
pub fn ready_message(webhook: &Webhook) -> String {
    webhook
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Whether Ready has this status and reason for the current generation.
pub fn ready_is(webhook: &Webhook, status: &str, reason: &str) -> bool {
    let current =
        webhook.status.as_ref().and_then(|s| s.observed_generation) == webhook.metadata.generation;
    current && ready(webhook) == Some((status.to_string(), reason.to_string()))
}

/// A `herald controller` process against the shared plane; killed when dropped.
pub struct Controller {
    process: Process,
    /// The receiver's base URL.
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Controller {
    /// Starts a controller watching `watch` namespaces, with the Lease `<own>-leader`, running as
    /// Herald's ServiceAccount, and waits for `/readyz`.
    pub async fn start(own: &str, watch: &[&str], extra: &[&str]) -> Controller {
        Self::start_with_kubeconfig(own, watch, extra, &service_account_kubeconfig()).await
    }

    /// [`Controller::start`] with another kubeconfig.
    pub async fn start_with_kubeconfig(
        own: &str,
        watch: &[&str],
        extra: &[&str],
        kubeconfig: &Path,
    ) -> Controller {
        plane();
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("controller.log");
        let port = free_port();
        let mut args: Vec<String> = vec![
            "controller".into(),
            "--kubeconfig".into(),
            kubeconfig.to_string_lossy().into_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            // The test endpoints listen on loopback, which a controller refuses by default.
            "--allow-loopback".into(),
            // Herald's own namespace, where its RBAC allows Leases; one Lease per test.
            "--namespace".into(),
            "herald".into(),
            "--lease-name".into(),
            format!("{own}-leader"),
            "--status-interval".into(),
            "200ms".into(),
            "--retry-initial-backoff".into(),
            "50ms".into(),
            "--retry-max-backoff".into(),
            "500ms".into(),
        ];
        for ns in watch {
            args.push("--watch-namespace".into());
            args.push((*ns).into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut command = Command::new(crate::cli::binary());
        command.args(&args).env("RUST_LOG", "info,herald=debug");
        let process =
            Process::spawn("herald controller", command, &log).expect("spawn herald controller");
        let mut controller = Controller {
            process,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let readyz = format!("{}/readyz", controller.base);
        if let Err(exited) = controller
            .process
            .wait_answering(&readyz, Duration::from_secs(30))
            .await
        {
            panic!(
                "the controller exited ({exited}) before it was ready; log:\n{}",
                controller.log()
            );
        }
        controller
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Posts alerts (Alertmanager payload with these label sets) and returns the reply body.
    pub async fn post(&self, alerts: &[serde_json::Value]) -> serde_json::Value {
        let payload = serde_json::json!({
            "version": "4", "status": "firing", "receiver": "herald", "groupLabels": {},
            "commonLabels": {}, "commonAnnotations": {}, "externalURL": "",
            "alerts": alerts.iter().map(|labels| serde_json::json!({"status": "firing", "labels": labels})).collect::<Vec<_>>(),
        });
        let response = reqwest::Client::new()
            .post(format!("{}/api/v1/alerts", self.base))
            .json(&payload)
            .send()
            .await
            .expect("post alerts");
        assert_eq!(response.status().as_u16(), 200);
        response.json().await.expect("reply")
    }

    /// Posts one alert until a delivery is queued for it (the table may lag a watch event).
    pub async fn post_until_delivered(&self, labels: serde_json::Value, deliveries: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = self.post(std::slice::from_ref(&labels)).await;
            if reply["deliveries"] == deliveries {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never got {deliveries} deliveries for {labels}; last reply {reply}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops with SIGTERM and waits (bounded); fails the test if it had to be killed.
    pub fn stop(mut self) {
        if let Err(e) = self.process.terminate(Duration::from_secs(20)) {
            panic!("{e:#}");
        }
    }
}
