//! Herald the way users run it: its image, built from the repository's Dockerfile, running as
//! pods on a real node (kubelet + containerd, see `hack/test-cluster.sh`), installed with
//! `kubectl apply -k deploy/` and with the Helm chart.
//!
//! The image is built offline from this build's `herald` binary (`hack/build-image.sh`) and
//! tagged as the name `deploy/` and the chart use, so both run unchanged. Needs root and the
//! tools of `hack/test`; nothing here is skipped.
//!
//! The tests share one cluster and run one at a time (each installs Herald and removes it).

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use herald_testkit::{node, sink};
use serde_json::{Value, json};

use node::{Cluster, IMAGE};
use sink::{Reply, Sink};

/// How long pods may take to become Ready (claims binding, image import, probes, a replaced
/// pod's grace period: a StatefulSet starts the successor once its predecessor is gone).
const POD_WAIT: Duration = Duration::from_secs(240);
/// How long a delivery or a status may take.
const WAIT: Duration = Duration::from_secs(120);

/// One installation at a time on the shared node (two cores). Held across awaits on purpose:
/// the guard lives for a whole test, on the test's own runtime.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pod_name(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .expect("pod name")
        .to_owned()
}

fn pod_ip(pod: &Value) -> String {
    pod["status"]["podIP"].as_str().expect("pod IP").to_owned()
}

/// A pod's uid: a StatefulSet's replacement pod has the same name and a new uid.
fn pod_uid(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().expect("pod uid").to_owned()
}

/// The pod named `name` among `pods`.
fn pod_named<'a>(pods: &'a [Value], name: &str) -> &'a Value {
    pods.iter()
        .find(|p| p["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no pod {name}"))
}

/// The receiver's bearer token: key `token` of Secret `secret` (decoded by kubectl).
fn receiver_token(cluster: &Cluster, namespace: &str, secret: &str) -> String {
    let token = cluster.kubectl(&[
        "get",
        "secret",
        "-n",
        namespace,
        secret,
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    assert!(!token.is_empty(), "Secret {secret} has no token");
    token
}

/// Waits (bounded) until `check` returns `Some`, polling every 500 ms.
fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Posts an Alertmanager webhook payload with one firing alert per name to a pod's receiver,
/// with the receiver's bearer `token`; returns the number of alerts it accepted (asserting the
/// 200).
async fn post_alerts(pod_ip: &str, token: &str, names: &[String]) -> u64 {
    let alerts: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({
                "status": "firing",
                "labels": {"alertname": name, "severity": "critical"},
                "annotations": {"summary": format!("{name} from the pod test")},
                "startsAt": "2026-12-07T10:00:00Z",
            })
        })
        .collect();
    let payload = json!({
        "version": "4", "status": "firing", "receiver": "herald",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager.test", "alerts": alerts,
    });
    let response = reqwest::Client::new()
        .post(format!("http://{pod_ip}:8080/api/v1/alerts"))
        .bearer_auth(token)
        .json(&payload)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap_or_else(|e| panic!("posting alerts to {pod_ip}: {e}"));
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "the receiver refused the alerts: {body}");
    body["accepted"].as_u64().expect("accepted count")
}

/// A Secret (labelled for Herald's use, which `--require-secret-consent` wants) and a Webhook
/// in `namespace` delivering every alert to `sink` with `auth`.
fn webhook_manifest(namespace: &str, sink: &Sink, auth: Value, secret: Value) -> String {
    [
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": "sink-auth", "namespace": namespace,
                "labels": {"herald.dev/use": "true"},
            },
            "stringData": secret,
        }),
        json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "Webhook",
            "metadata": {"name": "sink", "namespace": namespace},
            "spec": {
                "type": "Alarms",
                "url": sink.url_for("/hook"),
                "format": "alertmanager",
                "auth": auth,
                "timeoutSeconds": 5,
            },
        }),
    ]
    .iter()
    .map(|doc| doc.to_string())
    .collect::<Vec<_>>()
    .join("\n---\n")
}

/// Every alertname in the deliveries `received` (Alertmanager format).
fn alertnames(received: &[sink::Received]) -> BTreeSet<String> {
    received
        .iter()
        .flat_map(|r| {
            r.json()["alerts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
        })
        .collect()
}

/// The running container of a pod, seen from this machine: uid, read-only root, token.
fn assert_runs_confined(cluster: &Cluster, namespace: &str, pod: &str) {
    let pid = cluster.container_pid(namespace, pod, "herald");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line");
    assert!(
        uids.split_whitespace().all(|uid| uid == "65532"),
        "{pod} runs as uids {uids}, not 65532"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no root mount in {pod}:\n{mountinfo}"));
    let options = root.split_whitespace().nth(5).unwrap_or("");
    assert!(
        options.split(',').any(|o| o == "ro"),
        "{pod}'s root is not read-only: {root}"
    );
    let token = std::fs::read_to_string(format!(
        "/proc/{pid}/root/var/run/secrets/kubernetes.io/serviceaccount/token"
    ))
    .expect("the mounted ServiceAccount token");
    assert_eq!(token.split('.').count(), 3, "the token is not a JWT");
}

/// The Lease's holder, once it names one of `pods`.
fn leader(cluster: &Cluster, namespace: &str, lease: &str, pods: &[String]) -> String {
    eventually("a Lease naming a pod", WAIT, || {
        let lease = cluster.get_json(&["lease", "-n", namespace, lease]);
        lease["spec"]["holderIdentity"]
            .as_str()
            .filter(|holder| pods.iter().any(|p| p == holder))
            .map(str::to_owned)
    })
}

fn wait_webhook_ready(cluster: &Cluster, namespace: &str) {
    let out = cluster.run(
        "kubectl",
        &[
            "wait",
            "--for=condition=Ready",
            "webhook/sink",
            "-n",
            namespace,
            "--timeout=120s",
        ],
    );
    assert!(
        out.status.success(),
        "the Webhook did not become Ready: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.kubectl(&["get", "webhook", "sink", "-n", namespace, "-o", "yaml"])
    );
}

#[test]
fn the_image_runs_under_podman_as_the_statefulset_runs_it() {
    let _serial = serial();
    let cluster = node::shared();
    let podman = |args: &[&str]| {
        Command::new("podman")
            .args([
                "--runtime",
                "runc",
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
            ])
            .args(args)
            .output()
            .expect("running podman")
    };
    // The StatefulSet's security context: uid 65532, a read-only root, no capabilities.
    let out = podman(&[
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--read-only",
        "--user",
        "65532:65532",
        "--cap-drop",
        "ALL",
        "--network",
        "host",
        IMAGE,
        "--version",
    ]);
    assert!(
        out.status.success(),
        "podman run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("herald {}", env!("CARGO_PKG_VERSION"))
    );
    // The image's own configuration: non-root user, entrypoint, OCI labels.
    let inspect = podman(&["image", "inspect", IMAGE]);
    assert!(inspect.status.success());
    let config: Value = serde_json::from_slice(&inspect.stdout).expect("inspect JSON");
    let config = &config[0]["Config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], json!(["/herald"]));
    for label in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.source",
        "org.opencontainers.image.version",
        "org.opencontainers.image.licenses",
    ] {
        assert!(
            config["Labels"][label].is_string(),
            "label {label} missing: {}",
            config["Labels"]
        );
    }
    // The same image is on the node, under the name deploy/ and the chart use.
    let images = cluster.ctr(&["images", "ls", "-q"], None);
    assert!(
        String::from_utf8_lossy(&images.stdout)
            .lines()
            .any(|l| l == IMAGE)
    );
}

/// Waits until every alertname of `expected` has arrived in requests recorded from `since` on
/// (the sink answering 200); returns those requests.
fn wait_delivered_since(
    sink: &Sink,
    since: Instant,
    expected: &BTreeSet<String>,
) -> Vec<sink::Received> {
    eventually("every accepted alert delivered", WAIT, || {
        let answered_200: Vec<sink::Received> = sink
            .received()
            .into_iter()
            .filter(|r| r.at >= since)
            .collect();
        alertnames(&answered_200)
            .is_superset(expected)
            .then_some(answered_200)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn kubectl_apply_k_deploy_runs_ready_confined_pods_that_elect_a_leader_and_deliver() {
    let _serial = serial();
    let cluster = node::shared();
    let namespace = "herald";
    let selector = "app.kubernetes.io/name=herald";
    // The StatefulSet's claims (data-herald-0, data-herald-1) find a volume each.
    for replica in 0..2 {
        cluster.volume_for_claim(namespace, &format!("data-herald-{replica}"), "1Gi");
    }
    // As the README installs it: the manifests, then the receiver's token Secret.
    cluster.kubectl(&["apply", "--server-side", "-k", "deploy/"]);
    let token = "pod-test-receiver-token";
    cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "herald-receiver-token",
        "-n",
        namespace,
        &format!("--from-literal=token={token}"),
    ]);

    let pods = cluster.wait_ready_pods(namespace, selector, 2, POD_WAIT);
    let names: Vec<String> = pods.iter().map(pod_name).collect();
    for name in &names {
        assert_runs_confined(cluster, namespace, name);
    }
    // The Lease is written through the API server with the pod's ServiceAccount token.
    let holder = leader(cluster, namespace, "herald-leader", &names);
    // The node has an address the API server reaches: `kubectl logs` works (JSON lines).
    let logs = cluster.kubectl(&["logs", "-n", namespace, &holder]);
    assert!(
        logs.lines()
            .any(|line| serde_json::from_str::<Value>(line).is_ok()),
        "no JSON log line from {holder}:\n{logs}"
    );

    let sink = Sink::http_on(cluster.host_ip.into()).await;
    cluster.apply(&webhook_manifest(
        namespace,
        &sink,
        json!({"type": "Bearer", "secretRef": {"name": "sink-auth"}}),
        json!({"token": "pod-test-token"}),
    ));
    wait_webhook_ready(cluster, namespace);

    // Each replica receives and delivers on its own.
    for (i, pod) in pods.iter().enumerate() {
        let accepted = post_alerts(&pod_ip(pod), token, &[format!("FromPod{i}")]).await;
        assert_eq!(accepted, 1);
    }
    let received = sink.wait_for(2, WAIT).await;
    for r in &received {
        assert_eq!(
            r.header("authorization").as_deref(),
            Some("Bearer pod-test-token")
        );
    }
    assert_eq!(
        alertnames(&received),
        BTreeSet::from(["FromPod0".to_owned(), "FromPod1".to_owned()])
    );
    eprintln!("leader: {holder}; deliveries: {}", received.len());

    // A replica's backlog survives the deletion of its pod: the sink fails, herald-0 accepts
    // an alert, the pod is deleted (its grace period as deploy/ sets it), and the new herald-0
    // (same claim) delivers it once the sink recovers.
    sink.respond_with(vec![Reply::status(503)]);
    let herald_0 = pod_named(&pods, "herald-0");
    let kept = BTreeSet::from(["KeptThroughDeletion".to_owned()]);
    let names_kept: Vec<String> = kept.iter().cloned().collect();
    assert_eq!(post_alerts(&pod_ip(herald_0), token, &names_kept).await, 1);
    sink.wait_for(received.len() + 1, WAIT).await;
    let deleting = Instant::now();
    cluster.kubectl(&[
        "delete",
        "pod",
        "-n",
        namespace,
        "herald-0",
        "--timeout=120s",
    ]);
    let pods_after = cluster.wait_ready_pods(namespace, selector, 2, POD_WAIT);
    assert_ne!(
        pod_uid(pod_named(&pods_after, "herald-0")),
        pod_uid(herald_0),
        "herald-0 was not replaced"
    );
    let replaced_in = deleting.elapsed();
    let recovered_at = Instant::now();
    sink.respond_with(vec![Reply::status(200)]);
    let delivered = wait_delivered_since(&sink, recovered_at, &kept);
    eprintln!(
        "herald-0 replaced (Ready again) in {replaced_in:.1?}; {} requests answered 200 after \
         the sink recovered",
        delivered.len()
    );

    cluster.kubectl(&["delete", "namespace", namespace, "--timeout=120s"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn helm_release_keeps_every_accepted_delivery_through_pod_deletion_restart_and_upgrade() {
    let _serial = serial();
    let cluster = node::shared();
    let namespace = "herald-helm";
    let release = "h";
    let statefulset = format!("statefulset/{release}-herald");
    let selector = "app.kubernetes.io/instance=h";
    // The chart's default: one claim per replica from the StatefulSet's volumeClaimTemplate
    // (data-h-herald-0), bound to a volume made for it.
    cluster.volume_for_claim(namespace, "data-h-herald-0", "1Gi");
    // A grace period shorter than the default 60 s (the chart derives --shutdown-timeout
    // from it): each replaced pod spends it retrying the failing sink before it stops.
    cluster.ok(
        "helm",
        &[
            "install", release, "charts/herald", "--namespace", namespace, "--create-namespace",
            "--set", "replicaCount=1",
            "--set", "terminationGracePeriodSeconds=20",
            "--set-json",
            r#"extraArgs=["--retry-initial-backoff=500ms","--retry-max-backoff=2s","--retry-max-attempts=100000"]"#,
            "--wait", "--timeout", "5m",
        ],
    );
    let pods = cluster.wait_ready_pods(namespace, selector, 1, POD_WAIT);
    assert_runs_confined(cluster, namespace, &pod_name(&pods[0]));
    let claim = cluster.get_json(&["pvc", "-n", namespace, "data-h-herald-0"]);
    assert_eq!(claim["status"]["phase"], "Bound", "{claim}");
    // The chart made the receiver's token Secret.
    let token = receiver_token(cluster, namespace, "h-herald-receiver-token");
    let holder = leader(cluster, namespace, "h-herald-leader", &[pod_name(&pods[0])]);

    let sink = Sink::http_on(cluster.host_ip.into()).await;
    sink.respond_with(vec![Reply::status(503)]);
    cluster.apply(&webhook_manifest(
        namespace,
        &sink,
        json!({"type": "Basic", "secretRef": {"name": "sink-auth"}}),
        json!({"username": "herald", "password": "pod-test-password"}),
    ));
    wait_webhook_ready(cluster, namespace);

    let mut accepted_names = BTreeSet::new();
    let mut post = async |pod: &Value, batch: &str| {
        let names: Vec<String> = (0..3).map(|i| format!("{batch}{i}")).collect();
        assert_eq!(post_alerts(&pod_ip(pod), &token, &names).await, 3);
        accepted_names.extend(names);
    };

    // 1. Deliveries wait behind the failing sink; the pod is deleted. The StatefulSet's
    // replacement has the same name and a new uid.
    post(&pods[0], "BeforeDelete").await;
    sink.wait_for(1, WAIT).await;
    let first = pod_uid(&pods[0]);
    cluster.kubectl(&[
        "delete",
        "pod",
        "-n",
        namespace,
        &pod_name(&pods[0]),
        "--timeout=120s",
    ]);
    let pods = cluster.wait_ready_pods(namespace, selector, 1, POD_WAIT);
    assert_ne!(pod_uid(&pods[0]), first);

    // 2. A rollout restart.
    post(&pods[0], "BeforeRestart").await;
    let second = pod_uid(&pods[0]);
    cluster.kubectl(&["rollout", "restart", "-n", namespace, &statefulset]);
    cluster.kubectl(&[
        "rollout",
        "status",
        "-n",
        namespace,
        &statefulset,
        "--timeout=240s",
    ]);
    let pods = eventually("the restarted pod", POD_WAIT, || {
        let pods = cluster.wait_ready_pods(namespace, selector, 1, POD_WAIT);
        (pod_uid(&pods[0]) != second).then_some(pods)
    });

    // 3. A Helm upgrade that changes a value rolls the pod.
    post(&pods[0], "BeforeUpgrade").await;
    let third = pod_uid(&pods[0]);
    cluster.ok(
        "helm",
        &[
            "upgrade",
            release,
            "charts/herald",
            "--namespace",
            namespace,
            "--reuse-values",
            "--set",
            "podAnnotations.upgraded=yes",
            "--wait",
            "--timeout",
            "5m",
        ],
    );
    let pods = eventually("the upgraded pod", POD_WAIT, || {
        let pods = cluster.wait_ready_pods(namespace, selector, 1, POD_WAIT);
        (pod_uid(&pods[0]) != third).then_some(pods)
    });
    assert_eq!(pods[0]["metadata"]["annotations"]["upgraded"], "yes");
    // The upgrade kept the receiver's token.
    assert_eq!(
        receiver_token(cluster, namespace, "h-herald-receiver-token"),
        token
    );

    // The sink recovers: every delivery answered 200 arrives, with its credentials.
    // A request recorded after the switch is answered 200.
    let recovered_at = Instant::now();
    sink.respond_with(vec![Reply::status(200)]);
    let delivered = wait_delivered_since(&sink, recovered_at, &accepted_names);
    assert_eq!(alertnames(&delivered), accepted_names);
    eprintln!(
        "pod {} replaced 3 times (first leader {holder}); {} failed attempts before the sink \
         recovered; {} alerts accepted, delivered in {} requests",
        pod_name(&pods[0]),
        sink.received()
            .iter()
            .filter(|r| r.at < recovered_at)
            .count(),
        accepted_names.len(),
        delivered.len()
    );
    for r in &delivered {
        assert_eq!(
            r.header("authorization").as_deref(),
            Some("Basic aGVyYWxkOnBvZC10ZXN0LXBhc3N3b3Jk"),
            "credentials of herald:pod-test-password"
        );
    }

    cluster.ok(
        "helm",
        &["uninstall", release, "--namespace", namespace, "--wait"],
    );
    cluster.kubectl(&["delete", "namespace", namespace, "--timeout=120s"]);
}
