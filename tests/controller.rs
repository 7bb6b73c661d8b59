//! `herald controller` against a real kube-apiserver and etcd on loopback. Each test works in
//! namespaces of its own and runs its own controller process watching only those.

use std::time::Duration;

use cluster::{Controller, apply, kubectl, kubectl_stdin, ready_is, wait_webhook};
use herald::crd::{DeliveryOutcome, Webhook};
use herald_testkit::{cli, cluster, sink};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use sink::{Reply, Sink};

const WAIT: Duration = Duration::from_secs(20);

fn webhook(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

#[tokio::test]
async fn the_api_server_rejects_invalid_resources_with_the_rules_message() {
    let client = cluster::client().await;
    cluster::namespace(&client, "crd-rules").await;
    let cases = [
        (
            "spec: {url: 'ftp://x'}",
            "url must be an absolute http or https URL",
        ),
        (
            "spec: {url: 'https://x', auth: {type: Bearer}}",
            "auth.secretRef is required for Bearer and Basic auth",
        ),
        (
            "spec: {url: 'https://x', auth: {type: Basic}}",
            "auth.secretRef is required for Bearer and Basic auth",
        ),
        (
            "spec: {url: 'https://x', headers: {Authorization: x}}",
            "headers may not set Authorization",
        ),
        (
            "spec: {url: 'https://x', headers: {webhook-id: x}}",
            "headers may not set Authorization",
        ),
        (
            "spec: {url: 'https://x', language: fr}",
            "Unsupported value: \"fr\"",
        ),
        (
            "spec: {url: 'https://x', timeoutSeconds: 0}",
            "should be greater than or equal to 1",
        ),
    ];
    for (i, (spec, message)) in cases.iter().enumerate() {
        let yaml = format!(
            "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: bad-{i}, namespace: crd-rules}}\n{spec}\n"
        );
        let out = kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} was accepted");
        assert!(
            stderr.contains(message),
            "{spec}: expected {message:?} in {stderr}"
        );
    }
    let conditions = [
        (
            "{key: severity, operator: In}",
            "In and NotIn need at least one value",
        ),
        (
            "{key: severity, operator: NotIn, values: []}",
            "In and NotIn need at least one value",
        ),
        (
            "{key: severity, operator: Exists, values: [x]}",
            "Exists and DoesNotExist take none",
        ),
        (
            "{key: severity, operator: DoesNotExist, values: [x]}",
            "Exists and DoesNotExist take none",
        ),
        (
            "{key: severity, operator: Equals, values: [x]}",
            "Unsupported value: \"Equals\"",
        ),
    ];
    for (i, (expression, message)) in conditions.iter().enumerate() {
        let yaml = format!(
            "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: bad-{i}, namespace: crd-rules}}\nspec: {{matchExpressions: [{expression}]}}\n"
        );
        let out = kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{expression} was accepted");
        assert!(
            stderr.contains(message),
            "{expression}: expected {message:?} in {stderr}"
        );
    }
    // The valid fixtures, every field set, are accepted, and defaults are filled in.
    // The fixture names its own namespace.
    cluster::namespace(&client, "monitoring").await;
    let valid = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/valid/everything.yaml");
    let out = kubectl(&["apply", "-f", valid.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(&[
        "get",
        "webhook",
        "events",
        "-n",
        "monitoring",
        "-o",
        "jsonpath={.spec.enabled} {.spec.language} {.spec.timeoutSeconds}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "true en 10",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn webhooks_follow_create_modify_disable_enable_delete() {
    let client = cluster::client().await;
    let ns = "lifecycle";
    cluster::namespace(&client, ns).await;
    let (first, second) = (Sink::http().await, Sink::http().await);
    let controller = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;

    apply(&webhook(ns, "hook", &format!("{{url: '{}'}}", first.url())));
    let wh = wait_webhook(&client, ns, "hook", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    assert_eq!(
        wh.status.as_ref().and_then(|s| s.observed_generation),
        Some(1)
    );
    let out = kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=10s",
        "-n",
        ns,
        "webhook/hook",
    ]);
    assert!(
        out.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    controller
        .post_until_delivered(json!({"alertname": "A"}), 1)
        .await;
    first.wait_for(1, WAIT).await;

    // Modify: the URL moves.
    apply(&webhook(
        ns,
        "hook",
        &format!("{{url: '{}'}}", second.url()),
    ));
    wait_webhook(&client, ns, "hook", "Ready at generation 2", |w| {
        ready_is(w, "True", "Ready") && w.metadata.generation == Some(2)
    })
    .await;
    controller
        .post_until_delivered(json!({"alertname": "B"}), 1)
        .await;
    second.wait_for(1, WAIT).await;

    // Disable: Ready=False/Disabled and nothing is routed.
    apply(&webhook(
        ns,
        "hook",
        &format!("{{url: '{}', enabled: false}}", second.url()),
    ));
    wait_webhook(&client, ns, "hook", "Disabled", |w| {
        ready_is(w, "False", "Disabled")
    })
    .await;
    controller
        .post_until_delivered(json!({"alertname": "C"}), 0)
        .await;

    // Enable again.
    apply(&webhook(
        ns,
        "hook",
        &format!("{{url: '{}', enabled: true}}", second.url()),
    ));
    wait_webhook(&client, ns, "hook", "Ready again", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    controller
        .post_until_delivered(json!({"alertname": "D"}), 1)
        .await;
    second.wait_for(2, WAIT).await;
    let status = wait_webhook(&client, ns, "hook", "showing its last delivery", |w| {
        w.status
            .as_ref()
            .and_then(|s| s.last_delivery.as_ref())
            .is_some()
    })
    .await
    .status
    .expect("status");
    let last = status.last_delivery.expect("lastDelivery");
    assert_eq!(last.outcome, DeliveryOutcome::Succeeded);
    assert_eq!(last.http_status, Some(200));
    // Exactly B and D reached the second URL: nothing while disabled, nothing twice.
    let alertnames: Vec<String> = second
        .received()
        .iter()
        .flat_map(|r| {
            r.json()["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    a["labels"]["alertname"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(alertnames, ["B", "D"], "deliveries to the second URL");

    // Delete.
    let out = kubectl(&["delete", "webhook", "hook", "-n", ns]);
    assert!(out.status.success());
    controller
        .post_until_delivered(json!({"alertname": "E"}), 0)
        .await;
    let before = second.count();
    second
        .assert_no_more_within(Duration::from_millis(300))
        .await;
    assert_eq!(second.count(), before);
}

#[tokio::test]
async fn secret_rotation_and_deletion_take_effect_without_a_restart() {
    let client = cluster::client().await;
    let ns = "rotation";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    let controller = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
    let secret = |token: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: auth, namespace: {ns}}}\nstringData: {{token: {token}}}\n"
        )
    };
    apply(&secret("first-token"));
    apply(&webhook(
        ns,
        "hook",
        &format!(
            "{{url: '{}', auth: {{type: Bearer, secretRef: {{name: auth}}}}}}",
            sink.url()
        ),
    ));
    wait_webhook(&client, ns, "hook", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    controller
        .post_until_delivered(json!({"alertname": "A"}), 1)
        .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].header("authorization").as_deref(),
        Some("Bearer first-token")
    );

    apply(&secret("second-token"));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        controller.post(&[json!({"alertname": "B"})]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = sink
            .received()
            .iter()
            .any(|r| r.header("authorization").as_deref() == Some("Bearer second-token"));
        if seen {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotated token never used; log:\n{}",
            controller.log()
        );
    }

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .delete("auth", &DeleteParams::default())
        .await
        .expect("delete secret");
    let wh = wait_webhook(&client, ns, "hook", "SecretNotFound", |w| {
        ready_is(w, "False", "SecretNotFound")
    })
    .await;
    let message = &wh.status.expect("status").conditions[0].message;
    assert!(
        message.contains("auth") && !message.contains("second-token"),
        "{message}"
    );
    controller
        .post_until_delivered(json!({"alertname": "C"}), 0)
        .await;

    apply(&secret("third-token"));
    let wh = wait_webhook(&client, ns, "hook", "Ready again", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    // No token reaches the log, the status or an Event.
    let status = serde_json::to_string(&wh.status).expect("status");
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let events = serde_json::to_string(
        &events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items,
    )
    .expect("events");
    for token in ["first-token", "second-token", "third-token"] {
        assert!(!controller.log().contains(token), "{token} reached the log");
        assert!(!status.contains(token), "{token} reached the status");
        assert!(!events.contains(token), "{token} reached an Event");
    }
}

#[tokio::test]
async fn a_missing_condition_blocks_delivery_until_it_exists() {
    let client = cluster::client().await;
    let ns = "conditions";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    let controller = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
    apply(&webhook(
        ns,
        "hook",
        &format!("{{url: '{}', conditions: [critical-only]}}", sink.url()),
    ));
    let wh = wait_webhook(&client, ns, "hook", "ConditionNotFound", |w| {
        ready_is(w, "False", "ConditionNotFound")
    })
    .await;
    assert!(
        wh.status.expect("status").conditions[0]
            .message
            .contains("critical-only")
    );
    controller
        .post_until_delivered(json!({"alertname": "A", "severity": "critical"}), 0)
        .await;
    sink.assert_none_within(Duration::from_millis(300)).await;

    apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: critical-only, namespace: {ns}}}\nspec: {{matchExpressions: [{{key: severity, operator: In, values: [critical]}}]}}\n"
    ));
    wait_webhook(&client, ns, "hook", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    controller
        .post_until_delivered(json!({"alertname": "A", "severity": "critical"}), 1)
        .await;
    let reply = controller
        .post(&[json!({"alertname": "B", "severity": "warning"})])
        .await;
    assert_eq!(reply["deliveries"], 0);
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].json()["alerts"][0]["labels"]["severity"], "critical");

    let out = kubectl(&["delete", "notificationcondition", "critical-only", "-n", ns]);
    assert!(out.status.success());
    wait_webhook(&client, ns, "hook", "ConditionNotFound again", |w| {
        ready_is(w, "False", "ConditionNotFound")
    })
    .await;
    controller
        .post_until_delivered(json!({"alertname": "A", "severity": "critical"}), 0)
        .await;
}

/// Waits (bounded) until an Event in `ns` satisfies `wanted`.
async fn wait_event(client: &kube::Client, ns: &str, what: &str, wanted: impl Fn(&Event) -> bool) {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = events.list(&ListParams::default()).await.expect("events");
        if list.items.iter().any(&wanted) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} event: {:?}",
            list.items
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `herald test <name> -n <ns>` in cluster mode (it sets the annotation and waits for
/// the status).
async fn herald_test_in_cluster(ns: &'static str, name: &'static str) -> std::process::Output {
    let kubeconfig = cluster::plane().kubeconfig.to_string_lossy().into_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(cli::binary())
            .args([
                "test",
                name,
                "-n",
                ns,
                "--kubeconfig",
                &kubeconfig,
                "--timeout",
                "30s",
            ])
            .output()
            .expect("herald test")
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn send_test_reaches_the_sink_and_shows_in_status_and_events() {
    let client = cluster::client().await;
    let ns = "send-test";
    cluster::namespace(&client, ns).await;
    let ok = Sink::http().await;
    let denied = Sink::http().await;
    denied.respond_with(vec![Reply::status(401)]);
    let _controller = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
    let headers = |value: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: ok-headers, namespace: {ns}}}\nstringData: {{X-Team: {value}}}\n"
        )
    };
    apply(&headers("one"));
    apply(&webhook(
        ns,
        "ok",
        &format!(
            "{{url: '{}', language: zh-CN, headersSecretRef: {{name: ok-headers}}}}",
            ok.url()
        ),
    ));
    apply(&webhook(
        ns,
        "denied",
        &format!("{{url: '{}'}}", denied.url()),
    ));
    wait_webhook(&client, ns, "ok", "Ready", |w| ready_is(w, "True", "Ready")).await;
    wait_webhook(&client, ns, "denied", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;

    let api: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let annotate =
        |value: &str| json!({"metadata": {"annotations": {"herald.dev/send-test": value}}});
    api.patch(
        "ok",
        &PatchParams::default(),
        &Patch::Merge(&annotate("first")),
    )
    .await
    .expect("annotate");
    let wh = wait_webhook(&client, ns, "ok", "tested", |w| {
        w.status
            .as_ref()
            .and_then(|s| s.last_test.as_ref())
            .is_some_and(|t| t.token == "first")
    })
    .await;
    let test = wh.status.expect("status").last_test.expect("lastTest");
    assert_eq!(test.outcome, DeliveryOutcome::Succeeded);
    assert_eq!(test.http_status, Some(200));
    let got = ok.wait_for(1, WAIT).await;
    assert_eq!(got[0].json()["test"], true);
    assert_eq!(got[0].json()["title"], "Herald 测试通知");

    // The same value again sends nothing; a new value sends again.
    api.patch(
        "ok",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"touched": "yes"}}})),
    )
    .await
    .expect("touch");
    ok.assert_no_more_within(Duration::from_millis(800)).await;
    api.patch(
        "ok",
        &PatchParams::default(),
        &Patch::Merge(&annotate("second")),
    )
    .await
    .expect("annotate");
    ok.wait_for(2, WAIT).await;
    // A change to a Secret it references re-reconciles the webhook from the controller's kept
    // copy: the test already sent for "second" is not sent again.
    apply(&headers("two"));
    ok.assert_no_more_within(Duration::from_millis(1500)).await;

    wait_event(&client, ns, "TestSucceeded", |e| {
        e.reason.as_deref() == Some("TestSucceeded")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ok")
    })
    .await;

    // `herald test` in cluster mode: sets the annotation, waits for status, exits non-zero on 401.
    let out = herald_test_in_cluster(ns, "denied").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("Failed, HTTP status 401"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = herald_test_in_cluster(ns, "ok").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Succeeded, HTTP status 200"));
}

#[tokio::test]
async fn a_robot_refusing_with_http_200_fails_the_test_in_status_event_and_herald_test() {
    let client = cluster::client().await;
    let ns = "robot-refusal";
    cluster::namespace(&client, ns).await;
    // DingTalk answers a refusal with HTTP 200 and an error code.
    let robot = Sink::http().await;
    robot.respond_with(vec![
        Reply::status(200).body(json!({"errcode": 310000, "errmsg": "keywords not in content"})),
    ]);
    let _controller = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
    apply(&webhook(
        ns,
        "ding",
        &format!("{{url: '{}', format: dingtalk}}", robot.url()),
    ));
    wait_webhook(&client, ns, "ding", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    let out = herald_test_in_cluster(ns, "ding").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "herald test exits non-zero: {stdout}"
    );
    assert!(stdout.contains("errcode 310000"), "{stdout}");

    let api: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let wh = api.get("ding").await.expect("webhook");
    let test = wh.status.expect("status").last_test.expect("lastTest");
    assert_eq!(test.outcome, DeliveryOutcome::Failed);
    assert_eq!(test.http_status, Some(200));
    assert!(
        test.message
            .contains("DingTalk refused the message: errcode 310000"),
        "{}",
        test.message
    );
    wait_event(&client, ns, "TestFailed naming the error code", |e| {
        e.reason.as_deref() == Some("TestFailed")
            && e.note
                .as_deref()
                .is_some_and(|n| n.contains("errcode 310000"))
    })
    .await;
}

#[tokio::test]
async fn tenants_see_only_their_own_namespace() {
    let client = cluster::client().await;
    let (central, tenant) = ("tenancy-central", "tenancy-team");
    cluster::namespace(&client, central).await;
    cluster::namespace(&client, tenant).await;
    let (central_sink, tenant_sink) = (Sink::http().await, Sink::http().await);
    let controller = Controller::start(
        central,
        &[central, tenant],
        &["--cluster-namespace", central],
    )
    .await;
    apply(&webhook(
        central,
        "all",
        &format!("{{url: '{}'}}", central_sink.url()),
    ));
    apply(&webhook(
        tenant,
        "mine",
        &format!("{{url: '{}'}}", tenant_sink.url()),
    ));
    wait_webhook(&client, tenant, "mine", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    wait_webhook(&client, central, "all", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;

    let reply = controller
        .post(&[
            json!({"alertname": "Other", "namespace": "someone-else"}),
            json!({"alertname": "Mine", "namespace": tenant}),
            json!({"alertname": "ClusterWide"}),
        ])
        .await;
    assert_eq!(reply["deliveries"], 2);
    let got = tenant_sink.wait_for(1, WAIT).await;
    let names: Vec<_> = got[0].json()["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .map(|a| a["labels"]["alertname"].clone())
        .collect();
    assert_eq!(names, [json!("Mine")]);
    let got = central_sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].json()["alerts"].as_array().expect("alerts").len(), 3);
}

#[tokio::test]
async fn a_restarted_controller_rebuilds_the_same_table_and_keeps_status() {
    let client = cluster::client().await;
    let ns = "restart";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    for (name, severity) in [("crit", "critical"), ("warn", "warning")] {
        apply(&format!(
            "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{matchExpressions: [{{key: severity, operator: In, values: [{severity}]}}]}}\n"
        ));
    }
    for i in 0..5 {
        apply(&webhook(
            ns,
            &format!("hook-{i}"),
            &format!("{{url: '{}', conditions: [crit]}}", sink.url()),
        ));
    }
    // Gets only warnings, so its status shows what the first controller delivered.
    let quiet = |headers: &str| {
        webhook(
            ns,
            "quiet",
            &format!("{{url: '{}', conditions: [warn]{headers}}}", sink.url()),
        )
    };
    apply(&quiet(""));
    apply(&webhook(
        ns,
        "broken",
        &format!("{{url: '{}', conditions: [absent]}}", sink.url()),
    ));
    let alert = json!({"alertname": "A", "severity": "critical"});

    let first = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
    first.post_until_delivered(alert.clone(), 5).await;
    first
        .post_until_delivered(json!({"alertname": "W", "severity": "warning"}), 1)
        .await;
    wait_webhook(&client, ns, "quiet", "showing a delivery", |w| {
        w.status
            .as_ref()
            .and_then(|s| s.last_delivery.as_ref())
            .is_some()
    })
    .await;
    first.stop();
    let api: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let delivered_by_first = api
        .get("quiet")
        .await
        .expect("get")
        .status
        .and_then(|s| s.last_delivery)
        .expect("lastDelivery written by the first controller");

    let second = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
    // Ready right after start: the table is complete, no waiting for watch events.
    let reply = second.post(&[alert]).await;
    assert_eq!(reply["deliveries"], 5, "{reply}");
    // The second controller writes quiet's status for a new generation (a header, nothing
    // that changes routing) before it has delivered anything there: the first controller's
    // lastDelivery must be kept as it was.
    apply(&quiet(", headers: {X-Restarted: 'yes'}"));
    let rewritten = wait_webhook(&client, ns, "quiet", "Ready at generation 2", |w| {
        ready_is(w, "True", "Ready") && w.metadata.generation == Some(2)
    })
    .await;
    assert_eq!(
        rewritten.status.and_then(|s| s.last_delivery),
        Some(delivered_by_first),
        "the restart changed or erased lastDelivery"
    );
    let broken = wait_webhook(&client, ns, "broken", "ConditionNotFound", |w| {
        ready_is(w, "False", "ConditionNotFound")
    })
    .await;
    assert!(broken.status.is_some());
}

#[tokio::test]
async fn with_two_replicas_one_leader_sends_each_test_once() {
    let client = cluster::client().await;
    let ns = "replicas";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    let a = Controller::start(
        ns,
        &[ns],
        &["--cluster-namespace", ns, "--identity", "replica-a"],
    )
    .await;
    let b = Controller::start(
        ns,
        &[ns],
        &["--cluster-namespace", ns, "--identity", "replica-b"],
    )
    .await;
    apply(&webhook(ns, "hook", &format!("{{url: '{}'}}", sink.url())));
    wait_webhook(&client, ns, "hook", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;

    // Both replicas receive and deliver.
    a.post_until_delivered(json!({"alertname": "ViaA"}), 1)
        .await;
    b.post_until_delivered(json!({"alertname": "ViaB"}), 1)
        .await;
    sink.wait_for(2, WAIT).await;

    let api: Api<Webhook> = Api::namespaced(client.clone(), ns);
    api.patch(
        "hook",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {"herald.dev/send-test": "once"}}})),
    )
    .await
    .expect("annotate");
    wait_webhook(&client, ns, "hook", "tested", |w| {
        w.status
            .as_ref()
            .and_then(|s| s.last_test.as_ref())
            .is_some_and(|t| t.token == "once")
    })
    .await;
    sink.assert_no_more_within(Duration::from_secs(1)).await;
    let tests = sink
        .received()
        .iter()
        .filter(|r| r.json()["test"] == true)
        .count();
    assert_eq!(tests, 1, "exactly one replica sends the test");
    let out = kubectl(&[
        "get",
        "lease",
        "replicas-leader",
        "-n",
        "herald",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    let holder = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        holder == "replica-a" || holder == "replica-b",
        "lease holder {holder:?}"
    );
}

fn kube_event(ns: &str, name: &str, reason: &str, type_: &str, pod: &str) -> Event {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    Event {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        reason: Some(reason.into()),
        type_: Some(type_.into()),
        note: Some(format!("{reason} happened to {pod}")),
        action: Some("Testing".into()),
        reporting_controller: Some("tests.herald.dev/kubelet".into()),
        reporting_instance: Some("node-1".into()),
        regarding: Some(ObjectReference {
            kind: Some("Pod".into()),
            name: Some(pod.into()),
            namespace: Some(ns.into()),
            ..ObjectReference::default()
        }),
        ..Event::default()
    }
}

#[tokio::test]
async fn events_webhooks_get_each_matching_kubernetes_event_once() {
    use kube::api::PostParams;
    let client = cluster::client().await;
    let ns = "kube-events";
    cluster::namespace(&client, ns).await;
    let events_sink = Sink::http().await;
    let alarms_sink = Sink::http().await;
    let _controller = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
    apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: warnings, namespace: {ns}}}\nspec: {{matchExpressions: [{{key: type, operator: In, values: [Warning]}}]}}\n"
    ));
    apply(&webhook(
        ns,
        "events",
        &format!(
            "{{type: Events, url: '{}', eventTypes: [BackOff], conditions: [warnings]}}",
            events_sink.url()
        ),
    ));
    apply(&webhook(
        ns,
        "alarms",
        &format!("{{url: '{}'}}", alarms_sink.url()),
    ));
    wait_webhook(&client, ns, "events", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    wait_webhook(&client, ns, "alarms", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    // Leadership is taken within the first election round.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let pp = PostParams::default();
    events
        .create(&pp, &kube_event(ns, "web.1", "BackOff", "Warning", "web"))
        .await
        .expect("create");
    events
        .create(&pp, &kube_event(ns, "web.2", "Pulled", "Normal", "web"))
        .await
        .expect("create");
    events
        .create(&pp, &kube_event(ns, "web.3", "BackOff", "Normal", "web"))
        .await
        .expect("create");

    let got = events_sink.wait_for(1, WAIT).await;
    let body = got[0].json();
    assert_eq!(body["type"], "Events");
    let labels = &body["alerts"][0]["labels"];
    assert_eq!(labels["reason"], "BackOff");
    assert_eq!(labels["type"], "Warning");
    assert_eq!(labels["kind"], "Pod");
    assert_eq!(labels["name"], "web");
    assert_eq!(labels["namespace"], ns);
    assert_eq!(labels["reportingController"], "tests.herald.dev/kubelet");
    assert_eq!(
        body["alerts"][0]["annotations"]["message"],
        "BackOff happened to web"
    );

    // A change that keeps the count is not delivered again; a new count is.
    let patch = |value: serde_json::Value| Patch::Merge(value);
    events
        .patch(
            "web.1",
            &PatchParams::default(),
            &patch(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("patch labels");
    events_sink
        .assert_no_more_within(Duration::from_millis(800))
        .await;
    events
        .patch(
            "web.1",
            &PatchParams::default(),
            &patch(
                json!({"series": {"count": 2, "lastObservedTime": "2026-11-25T10:05:00.000000Z"}}),
            ),
        )
        .await
        .expect("patch series");
    let got = events_sink.wait_for(2, WAIT).await;
    assert_eq!(
        got[1].json()["alerts"][0]["fingerprint"]
            .as_str()
            .map(|f| f.ends_with("/2")),
        Some(true)
    );
    events_sink
        .assert_no_more_within(Duration::from_millis(500))
        .await;
    assert_eq!(
        alarms_sink.count(),
        0,
        "Alarms webhooks never get Kubernetes Events"
    );
}

#[tokio::test]
async fn a_webhook_whose_deliveries_start_failing_gets_a_warning_event() {
    let client = cluster::client().await;
    let ns = "failing";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    sink.respond_with(vec![Reply::status(400)]);
    let controller =
        Controller::start(ns, &[ns], &["--cluster-namespace", ns, "--events=false"]).await;
    apply(&webhook(ns, "hook", &format!("{{url: '{}'}}", sink.url())));
    let wh = deliver_one_that_fails(&controller, &client, ns, "hook").await;
    assert_eq!(
        wh.status
            .and_then(|s| s.last_delivery)
            .and_then(|d| d.http_status),
        Some(400)
    );
    wait_event(&client, ns, "DeliveryFailing", |e| {
        e.reason.as_deref() == Some("DeliveryFailing") && e.type_.as_deref() == Some("Warning")
    })
    .await;
}

#[tokio::test]
async fn service_account_tokens_and_unmarked_secrets_are_refused() {
    let client = cluster::client().await;
    let ns = "secret-consent";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    let _controller = Controller::start(
        ns,
        &[ns],
        &["--cluster-namespace", ns, "--require-secret-consent"],
    )
    .await;
    // A ServiceAccount token Secret, even one marked for Herald: never sent.
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: sa-token, namespace: {ns}, labels: {{herald.dev/use: 'true'}}, annotations: {{kubernetes.io/service-account.name: default}}}}\ntype: kubernetes.io/service-account-token\nstringData: {{token: sa-t0ken-value}}\n"
    ));
    // An ordinary Secret without the mark: refused until its owner marks it.
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: plain, namespace: {ns}}}\nstringData: {{token: plain-t0ken}}\n"
    ));
    for (name, secret) in [("steal", "sa-token"), ("plain", "plain")] {
        apply(&webhook(
            ns,
            name,
            &format!(
                "{{url: '{}', auth: {{type: Bearer, secretRef: {{name: {secret}}}}}}}",
                sink.url()
            ),
        ));
    }
    let steal = wait_webhook(&client, ns, "steal", "Ready=False SecretRefused", |w| {
        ready_is(w, "False", "SecretRefused")
    })
    .await;
    let condition = cluster::ready_message(&steal);
    assert!(condition.contains("ServiceAccount token"), "{condition}");
    wait_webhook(&client, ns, "plain", "Ready=False SecretRefused", |w| {
        ready_is(w, "False", "SecretRefused")
    })
    .await;
    kubectl(&["label", "-n", ns, "secret/plain", "herald.dev/use=true"]);
    wait_webhook(&client, ns, "plain", "Ready=True", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    let steal: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let steal = steal.get("steal").await.expect("webhook");
    assert!(ready_is(&steal, "False", "SecretRefused"));
    assert!(
        sink.received()
            .iter()
            .all(|r| r.header("authorization").as_deref() != Some("Bearer sa-t0ken-value")),
        "a ServiceAccount token was sent"
    );
}

#[tokio::test]
async fn a_heavy_template_fails_its_delivery_with_the_reason_in_status_and_an_event() {
    let client = cluster::client().await;
    let ns = "heavy-template";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    let controller =
        Controller::start(ns, &[ns], &["--cluster-namespace", ns, "--events=false"]).await;
    apply(&webhook(
        ns,
        "hook",
        &format!(
            "{{url: '{}', template: '{{% for i in range(100000) %}}{{% for j in range(100000) %}}{{% endfor %}}{{% endfor %}}'}}",
            sink.url()
        ),
    ));
    let wh = deliver_one_that_fails(&controller, &client, ns, "hook").await;
    let message = wh
        .status
        .and_then(|s| s.last_delivery)
        .map(|d| d.message)
        .unwrap_or_default();
    assert!(message.contains("steps"), "{message}");
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = events.list(&ListParams::default()).await.expect("events");
        if list.items.iter().any(|e| {
            e.reason.as_deref() == Some("DeliveryFailing")
                && e.note.as_deref().is_some_and(|n| n.contains("steps"))
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no DeliveryFailing event naming the template's steps: {:?}",
            list.items
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sink.assert_none_within(Duration::from_millis(100)).await;
}

/// Waits for webhook `name` to be Ready, delivers one alert to it, and returns the Webhook once
/// its `status.lastDelivery` says Failed.
async fn deliver_one_that_fails(
    controller: &Controller,
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Webhook {
    wait_webhook(client, ns, name, "Ready", |w| ready_is(w, "True", "Ready")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    controller
        .post_until_delivered(json!({"alertname": "A"}), 1)
        .await;
    wait_webhook(client, ns, name, "failed", |w| {
        w.status
            .as_ref()
            .and_then(|s| s.last_delivery.as_ref())
            .is_some_and(|d| d.outcome == DeliveryOutcome::Failed)
    })
    .await
}

/// The controller's `/metrics` page.
async fn metrics_text(controller: &Controller) -> String {
    reqwest::get(format!("{}/metrics", controller.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The NotificationCondition as (Ready status, message, whether observedGeneration is current).
async fn condition_ready(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Option<(String, String, bool)> {
    use herald::crd::NotificationCondition;
    let api: Api<NotificationCondition> = Api::namespaced(client.clone(), ns);
    let condition = api.get(name).await.expect("get condition");
    let status = condition.status?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    let current = status.observed_generation == condition.metadata.generation
        && ready.observed_generation == condition.metadata.generation;
    Some((ready.status.clone(), ready.message.clone(), current))
}

/// Waits (bounded) until a condition's current Ready is True with this message.
async fn wait_condition_message(client: &kube::Client, ns: &str, name: &str, message: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let seen = condition_ready(client, ns, name).await;
        if seen == Some(("True".to_string(), message.to_string(), true)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition {ns}/{name} never showed {message:?}; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn conditions_show_ready_with_the_webhooks_that_use_them() {
    let client = cluster::client().await;
    let ns = "condition-status";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    let _controller = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
    apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: crit, namespace: {ns}}}\nspec: {{matchExpressions: [{{key: severity, operator: In, values: [critical]}}]}}\n"
    ));
    apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: team-x, namespace: {ns}}}\nspec: {{matchExpressions: [{{key: team, operator: Exists}}], webhookSelector: {{matchLabels: {{team: x}}}}}}\n"
    ));
    apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: unused, namespace: {ns}}}\nspec: {{matchExpressions: [{{key: team, operator: Exists}}]}}\n"
    ));
    wait_condition_message(&client, ns, "unused", "used by no Webhook").await;
    for name in ["a", "b"] {
        apply(&webhook(
            ns,
            name,
            &format!("{{url: '{}', conditions: [crit]}}", sink.url()),
        ));
    }
    apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: c, namespace: {ns}, labels: {{team: x}}}}\nspec: {{url: '{}'}}\n",
        sink.url()
    ));
    wait_condition_message(&client, ns, "crit", "used by 2 Webhook(s): a, b").await;
    wait_condition_message(&client, ns, "team-x", "used by 1 Webhook(s): c").await;
    wait_condition_message(&client, ns, "unused", "used by no Webhook").await;

    // A deleted user drops out; a new generation is observed.
    kubectl(&["delete", "webhook", "b", "-n", ns]);
    wait_condition_message(&client, ns, "crit", "used by 1 Webhook(s): a").await;
    apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: crit, namespace: {ns}}}\nspec: {{matchExpressions: [{{key: severity, operator: In, values: [critical, page]}}]}}\n"
    ));
    let api: Api<herald::crd::NotificationCondition> = Api::namespaced(client.clone(), ns);
    assert_eq!(
        api.get("crit").await.expect("get").metadata.generation,
        Some(2)
    );
    wait_condition_message(&client, ns, "crit", "used by 1 Webhook(s): a").await;
}

#[tokio::test]
async fn a_send_test_pending_at_each_restart_always_finds_the_condition() {
    let client = cluster::client().await;
    let ns = "restart-tests";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: critical-only, namespace: {ns}}}\nspec: {{matchExpressions: [{{key: severity, operator: In, values: [critical]}}]}}\n"
    ));
    apply(&webhook(
        ns,
        "hook",
        &format!("{{url: '{}', conditions: [critical-only]}}", sink.url()),
    ));
    let api: Api<Webhook> = Api::namespaced(client.clone(), ns);
    for round in 0..6 {
        // Asked for while no controller runs: the next one answers it as it starts.
        let token = format!("restart-{round}");
        api.patch(
            "hook",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"herald.dev/send-test": token}}})),
        )
        .await
        .expect("annotate");
        let controller = Controller::start(ns, &[ns], &["--cluster-namespace", ns]).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let test = loop {
            let current = api.get("hook").await.expect("get");
            if let Some(test) = current
                .status
                .as_ref()
                .and_then(|s| s.last_test.clone())
                .filter(|t| t.token == token)
            {
                break test;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the test never showed in status: {:#?}\n{}",
                current.status,
                controller.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            test.outcome,
            DeliveryOutcome::Succeeded,
            "round {round}: {}\n{}",
            test.message,
            controller.log()
        );
        controller.stop();
    }
    let tests = sink
        .received()
        .iter()
        .filter(|r| r.json()["test"] == true)
        .count();
    assert_eq!(tests, 6, "one test message per restart");
}

#[tokio::test]
async fn a_new_leader_delivers_the_events_created_while_none_ran_once() {
    use kube::api::PostParams;
    let client = cluster::client().await;
    let ns = "events-failover";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    apply(&webhook(
        ns,
        "events",
        &format!(
            "{{type: Events, url: '{}', eventTypes: [BackOff]}}",
            sink.url()
        ),
    ));
    let leader_of = || {
        let out = kubectl(&[
            "get",
            "lease",
            &format!("{ns}-leader"),
            "-n",
            "herald",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let pp = PostParams::default();

    let first = Controller::start(
        ns,
        &[ns],
        &["--cluster-namespace", ns, "--identity", "first"],
    )
    .await;
    wait_webhook(&client, ns, "events", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    assert_eq!(leader_of(), "first");
    events
        .create(
            &pp,
            &kube_event(ns, "before.1", "BackOff", "Warning", "web"),
        )
        .await
        .expect("create");
    sink.wait_for(1, WAIT).await;
    first.stop();

    // No leader runs: these wait for the next one.
    for name in ["between.1", "between.2"] {
        events
            .create(&pp, &kube_event(ns, name, "BackOff", "Warning", "web"))
            .await
            .expect("create");
    }
    let second = Controller::start(
        ns,
        &[ns],
        &["--cluster-namespace", ns, "--identity", "second"],
    )
    .await;
    // Every alert's fingerprint (uid/count), sorted: requests may merge Events.
    let fingerprints = |sink: &Sink| -> Vec<String> {
        let mut all = Vec::new();
        for request in sink.received() {
            let body = request.json();
            for alert in body["alerts"].as_array().into_iter().flatten() {
                all.push(
                    alert["fingerprint"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
        all.sort();
        all
    };
    let deadline = std::time::Instant::now() + WAIT;
    while fingerprints(&sink).len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sink.assert_no_more_within(Duration::from_secs(2)).await;
    assert_eq!(leader_of(), "second");
    let mut expected = Vec::new();
    for name in ["before.1", "between.1", "between.2"] {
        let uid = events
            .get(name)
            .await
            .expect("get")
            .metadata
            .uid
            .expect("uid");
        expected.push(format!("{uid}/1"));
    }
    expected.sort();
    assert_eq!(
        fingerprints(&sink),
        expected,
        "each Event delivered once, none missed\n{}",
        second.log()
    );

    // And a later one still arrives, once.
    events
        .create(&pp, &kube_event(ns, "after.1", "BackOff", "Warning", "web"))
        .await
        .expect("create");
    let deadline = std::time::Instant::now() + WAIT;
    while fingerprints(&sink).len() < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sink.assert_no_more_within(Duration::from_secs(1)).await;
    assert_eq!(fingerprints(&sink).len(), 4, "{}", second.log());
}

/// What the API server proxy does with reads of one Secret.
const PASS: u8 = 0;
const FAIL: u8 = 1;
const HANG: u8 = 2;

/// A plain-HTTP proxy in front of the shared API server that lets everything through (with the
/// admin client's credentials; the controller's impersonation header goes along) except GETs
/// of single objects below `secrets_path`, which it fails with 500 or holds while `fault` says
/// so. Returns a kubeconfig for it that impersonates Herald's ServiceAccount.
async fn faulty_api_proxy(
    fault: std::sync::Arc<std::sync::atomic::AtomicU8>,
    secrets_path: String,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering;
    type ProxyBody = http_body_util::combinators::UnsyncBoxBody<
        bytes::Bytes,
        Box<dyn std::error::Error + Send + Sync>,
    >;
    let upstream = cluster::client().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let addr = listener.local_addr().expect("proxy address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let fault = fault.clone();
            let secrets_path = secrets_path.clone();
            let service = hyper::service::service_fn(
                move |request: http::Request<hyper::body::Incoming>| {
                    let upstream = upstream.clone();
                    let fault = fault.clone();
                    let faulty = request.method() == http::Method::GET
                        && request.uri().path().starts_with(&secrets_path);
                    async move {
                        while faulty && fault.load(Ordering::SeqCst) == HANG {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        if faulty && fault.load(Ordering::SeqCst) == FAIL {
                            let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"injected failure","reason":"InternalError","code":500}"#;
                            let body: ProxyBody =
                                http_body_util::Full::new(bytes::Bytes::from(status))
                                    .map_err(|e| match e {})
                                    .boxed_unsync();
                            let mut response = http::Response::new(body);
                            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                            return Ok::<_, std::convert::Infallible>(response);
                        }
                        let (parts, body) = request.into_parts();
                        let bytes = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let forwarded = http::Request::from_parts(
                            parts,
                            kube::client::Body::from(bytes.to_vec()),
                        );
                        Ok(match upstream.send(forwarded).await {
                            Ok(response) => response.map(|b| {
                                b.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> {
                                    Box::new(e)
                                })
                                .boxed_unsync()
                            }),
                            Err(e) => {
                                let body: ProxyBody =
                                    http_body_util::Full::new(bytes::Bytes::from(e.to_string()))
                                        .map_err(|e| match e {})
                                        .boxed_unsync();
                                let mut response = http::Response::new(body);
                                *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                                response
                            }
                        })
                    }
                },
            );
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "proxy", "cluster": {"server": format!("http://{addr}")}}],
        "users": [{"name": "herald", "user": {"as": cluster::SERVICE_ACCOUNT}}],
        "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "herald"}}],
        "current-context": "proxy",
    });
    let path = dir.join("proxy.kubeconfig");
    std::fs::write(&path, kubeconfig.to_string()).expect("write kubeconfig");
    path
}

#[tokio::test]
async fn an_unreadable_secret_shows_in_status_is_retried_and_stalls_no_other_webhook() {
    use std::sync::atomic::Ordering;
    let client = cluster::client().await;
    let ns = "secret-faults";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: auth, namespace: {ns}}}\nstringData: {{token: the-token}}\n"
    ));
    let fault = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(FAIL));
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = faulty_api_proxy(
        fault.clone(),
        format!("/api/v1/namespaces/{ns}/secrets/"),
        dir.path(),
    )
    .await;
    let controller =
        Controller::start_with_kubeconfig(ns, &[ns], &["--cluster-namespace", ns], &kubeconfig)
            .await;
    let with_secret = |name: &str| {
        webhook(
            ns,
            name,
            &format!(
                "{{url: '{}', auth: {{type: Bearer, secretRef: {{name: auth}}}}}}",
                sink.url()
            ),
        )
    };

    // A failed read is a clear reason, not "missing".
    apply(&with_secret("failing"));
    let failing = wait_webhook(&client, ns, "failing", "SecretUnreadable", |w| {
        ready_is(w, "False", "SecretUnreadable")
    })
    .await;
    let message = cluster::ready_message(&failing);
    assert!(message.contains("\"auth\""), "{message}");
    assert!(message.contains("retrying"), "{message}");
    assert!(!message.contains("the-token"), "{message}");

    // Retried: once the API server answers, the webhook delivers without any change to it.
    fault.store(PASS, Ordering::SeqCst);
    wait_webhook(&client, ns, "failing", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    let metrics = metrics_text(&controller).await;
    assert!(
        metrics.contains(r#"herald_reconcile_errors_total{kind="Webhook",error="secret_read"}"#),
        "{metrics}"
    );

    // A read that hangs holds back its own webhook only: others are reconciled meanwhile.
    fault.store(HANG, Ordering::SeqCst);
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: other-auth, namespace: {ns}}}\nstringData: {{token: the-other-token}}\n"
    ));
    // Two webhooks wait for the same read.
    for name in ["held", "held-too"] {
        apply(&webhook(
            ns,
            name,
            &format!(
                "{{url: '{}', auth: {{type: Bearer, secretRef: {{name: other-auth}}}}}}",
                sink.url()
            ),
        ));
    }
    apply(&webhook(ns, "plain", &format!("{{url: '{}'}}", sink.url())));
    wait_webhook(&client, ns, "plain", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    let api: Api<Webhook> = Api::namespaced(client.clone(), ns);
    for name in ["held", "held-too"] {
        let held = api.get(name).await.expect("get");
        assert!(
            held.status.is_none_or(|s| s.observed_generation.is_none()),
            "{name} was reconciled before its Secret could be read"
        );
    }
    fault.store(PASS, Ordering::SeqCst);
    for name in ["held", "held-too"] {
        wait_webhook(&client, ns, name, "Ready", |w| ready_is(w, "True", "Ready")).await;
    }
    controller
        .post_until_delivered(json!({"alertname": "A"}), 4)
        .await;
}

#[tokio::test]
async fn a_backlog_near_its_limit_shows_in_ready_and_events_and_recovers() {
    let client = cluster::client().await;
    let ns = "backlog";
    cluster::namespace(&client, ns).await;
    let sink = Sink::http().await;
    sink.respond_with(vec![Reply::status(200).held()]);
    let controller = Controller::start(
        ns,
        &[ns],
        &[
            "--cluster-namespace",
            ns,
            "--events=false",
            "--backlog-limit",
            "10",
        ],
    )
    .await;
    apply(&webhook(ns, "slow", &format!("{{url: '{}'}}", sink.url())));
    wait_webhook(&client, ns, "slow", "Ready", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    controller
        .post_until_delivered(json!({"alertname": "First"}), 1)
        .await;
    // Nine unfinished deliveries (one per request: a request is one group) of a limit of ten:
    // past the 80% mark.
    for i in 0..8 {
        let reply = controller
            .post(&[json!({"alertname": format!("A{i}")})])
            .await;
        assert_eq!(reply["deliveries"], 1, "{reply}");
    }
    let near = wait_webhook(&client, ns, "slow", "BacklogNearLimit", |w| {
        ready_is(w, "True", "BacklogNearLimit")
    })
    .await;
    let message = cluster::ready_message(&near);
    assert!(message.contains("of its limit of 10"), "{message}");
    let metrics = metrics_text(&controller).await;
    assert!(
        metrics.contains(r#"herald_delivery_queue_depth{namespace="backlog",webhook="slow"} 9"#),
        "{metrics}"
    );
    wait_event(&client, ns, "BacklogNearLimit", |e| {
        e.reason.as_deref() == Some("BacklogNearLimit") && e.type_.as_deref() == Some("Warning")
    })
    .await;

    // The endpoint answers again: the backlog drains, Ready says so and a Normal Event follows.
    sink.release();
    sink.wait_for(9, WAIT).await;
    wait_webhook(&client, ns, "slow", "Ready again", |w| {
        ready_is(w, "True", "Ready")
    })
    .await;
    wait_event(&client, ns, "BacklogRecovered", |e| {
        e.reason.as_deref() == Some("BacklogRecovered") && e.type_.as_deref() == Some("Normal")
    })
    .await;
}
