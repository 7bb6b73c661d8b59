//! A hostile tenant against the real `herald` binary: templates that stall or eat memory,
//! URLs that point back at Herald or at internal addresses, delivery loops, an admin API
//! reached through a tenant's URL or a rebound browser page, credentials echoed back in
//! encoded forms, and the chart's receiver authentication.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use cli::Running;
use herald_testkit::{cli, control_plane, sink};
use serde_json::{Value, json};
use sink::{Reply, Sink};

const WAIT: Duration = Duration::from_secs(20);

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).expect("write manifest");
}

fn webhook(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n---\n"
    )
}

fn alert(labels: Value) -> Value {
    json!({"status": "firing", "labels": labels, "annotations": {},
           "startsAt": "2026-11-25T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
           "generatorURL": "http://prometheus/graph", "fingerprint": ""})
}

fn payload(alerts: Vec<Value>) -> Value {
    json!({"version": "4", "status": "firing", "receiver": "herald", "groupLabels": {},
           "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager",
           "alerts": alerts})
}

/// The delivery records of one webhook, from the admin API.
async fn records(herald: &Running, webhook: &str) -> Vec<Value> {
    let url = format!("{}/api/v1/deliveries?webhook={webhook}", herald.admin_url());
    let body: Value = reqwest::get(&url)
        .await
        .expect("admin API")
        .json()
        .await
        .expect("JSON");
    body["deliveries"].as_array().cloned().unwrap_or_default()
}

/// Waits (bounded) for a webhook's first finished delivery record.
async fn first_record(herald: &Running, webhook: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(record) = records(herald, webhook).await.into_iter().next() {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery record for {webhook}; log:\n{}",
            herald.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/healthz` answers within a bounded wait.
async fn assert_healthy(herald: &Running) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let status = client
        .get(herald.url("/healthz"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(status.ok(), Some(200), "/healthz did not answer");
}

const ENDLESS: &str =
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done";

#[tokio::test]
async fn heavy_templates_fail_with_a_reason_while_everything_else_keeps_going() {
    let (heavy, other) = (Sink::http().await, Sink::http().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut manifests = String::new();
    for name in ["heavy-1", "heavy-2"] {
        manifests.push_str(&webhook(
            "team-a",
            name,
            &format!("{{url: '{}', template: '{ENDLESS}'}}", heavy.url()),
        ));
    }
    manifests.push_str(&webhook(
        "team-b",
        "plain",
        &format!("{{url: '{}'}}", other.url_for("/plain")),
    ));
    manifests.push_str(&webhook(
        "team-b",
        "templated",
        &format!(
            "{{url: '{}', template: '{{\"n\": {{{{ alerts | length }}}}}}'}}",
            other.url_for("/templated")
        ),
    ));
    write(dir.path(), "webhooks.yaml", &manifests);
    let herald = Running::start(dir.path(), &[]).await;

    let (status, body) = herald
        .post_alerts(&payload(vec![
            alert(json!({"alertname": "Stall", "namespace": "team-a"})),
            alert(json!({"alertname": "Fine", "namespace": "team-b"})),
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    // The other tenant's deliveries arrive, its template included, and Herald answers.
    let got = other.wait_for(2, WAIT).await;
    let mut paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/plain", "/templated"]);
    assert_healthy(&herald).await;
    // The heavy templates fail, each with its reason.
    for name in ["team-a/heavy-1", "team-a/heavy-2"] {
        let record = first_record(&herald, name).await;
        assert_eq!(record["outcome"], "Failed", "{record}");
        let error = record["error"].as_str().unwrap_or("");
        assert!(
            error.contains("steps") || error.contains("did not finish"),
            "{name}: {error}"
        );
    }
    heavy.assert_none_within(Duration::from_millis(200)).await;
    assert_healthy(&herald).await;
    assert!(herald.terminate().success(), "SIGTERM must stop Herald");
    // `herald check` says so before any alert arrives.
    let checked = cli::herald(&["check", dir.path().to_str().expect("path")]);
    let stderr = String::from_utf8_lossy(&checked.stderr);
    for name in ["team-a/heavy-1", "team-a/heavy-2"] {
        assert!(
            stderr.contains(&format!(
                "warning: {name}: spec.template fails on a test message"
            )),
            "{stderr}"
        );
    }
    assert!(!stderr.contains("team-b/templated"), "{stderr}");
}

/// Herald's peak resident set, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn a_memory_bomb_template_ends_its_worker_not_herald() {
    let (bomb_sink, other) = (Sink::http().await, Sink::http().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let bomb = "{% set a = \"x\" * 100000000 %}{% set b = a ~ a %}{% set c = b ~ b %}{% set d = c ~ c %}{{ d | length }}";
    let manifests = [
        webhook(
            "team-a",
            "bomb",
            &format!("{{url: '{}', template: '{bomb}'}}", bomb_sink.url()),
        ),
        webhook("team-b", "plain", &format!("{{url: '{}'}}", other.url())),
    ]
    .concat();
    write(dir.path(), "webhooks.yaml", &manifests);
    let herald = Running::start(dir.path(), &[]).await;
    for round in 0..3 {
        let (status, body) = herald
            .post_alerts(&payload(vec![
                alert(json!({"alertname": format!("Bomb{round}"), "namespace": "team-a"})),
                alert(json!({"alertname": format!("Fine{round}"), "namespace": "team-b"})),
            ]))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    other.wait_for(3, WAIT).await;
    let deadline = Instant::now() + WAIT;
    let failed = loop {
        let failed: Vec<Value> = records(&herald, "team-a/bomb")
            .await
            .into_iter()
            .filter(|r| r["outcome"] == "Failed")
            .collect();
        if failed.len() == 3 {
            break failed;
        }
        assert!(Instant::now() < deadline, "log:\n{}", herald.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for record in failed {
        let error = record["error"].as_str().unwrap_or("");
        assert!(error.contains("memory limit"), "{error}");
    }
    bomb_sink
        .assert_none_within(Duration::from_millis(100))
        .await;
    // Each render would have needed 1.6 GB; Herald itself never came close.
    let peak = peak_rss_kib(herald.pid());
    assert!(peak < 200 * 1024, "Herald's peak RSS was {peak} KiB");
    assert_healthy(&herald).await;
    assert!(herald.terminate().success());
}

#[tokio::test]
async fn a_delivery_loop_through_herald_receivers_ends_after_one_hop() {
    let (a_dir, b_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let a = Running::start(a_dir.path(), &[]).await;
    let b = Running::start(b_dir.path(), &[]).await;
    // A forwards to B and to itself; B forwards back to A: an endless loop without the mark.
    write(
        a_dir.path(),
        "webhooks.yaml",
        &[
            webhook(
                "default",
                "to-b",
                &format!(
                    "{{url: '{}', format: alertmanager}}",
                    b.url("/api/v1/alerts")
                ),
            ),
            webhook(
                "default",
                "to-self",
                &format!(
                    "{{url: '{}', format: alertmanager}}",
                    a.url("/api/v1/alerts")
                ),
            ),
        ]
        .concat(),
    );
    write(
        b_dir.path(),
        "webhooks.yaml",
        &webhook(
            "default",
            "to-a",
            &format!(
                "{{url: '{}', format: alertmanager}}",
                a.url("/api/v1/alerts")
            ),
        ),
    );
    a.wait_log("applied=2", WAIT).await;
    b.wait_log("applied=1", WAIT).await;

    let (status, body) = a
        .post_alerts(&payload(vec![alert(json!({"alertname": "Once"}))]))
        .await;
    assert_eq!(status, 200, "{body}");
    let to_b = first_record(&a, "default/to-b").await;
    assert_eq!(to_b["outcome"], "Failed", "{to_b}");
    assert_eq!(to_b["httpStatus"], 508, "{to_b}");
    assert_eq!(to_b["attempts"], 1, "a loop refusal is final: {to_b}");
    // Pointing at its own receiver is refused outright.
    let log = a.log();
    assert!(
        log.lines().any(|l| l.contains("default/to-self")
            && l.contains("ForbiddenAddress")
            && l.contains("Herald's own listeners")),
        "{log}"
    );
    // One alert in, one attempt out, and nothing more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(records(&a, "default/to-b").await.len(), 1);
    assert!(records(&a, "default/to-self").await.is_empty());
    assert!(records(&b, "default/to-a").await.is_empty());
}

#[tokio::test]
async fn the_admin_api_is_unreachable_through_tenant_urls_and_rebound_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "adm1n-t0ken\n").expect("token file");
    let config = tempfile::tempdir().expect("tempdir");
    let herald = Running::start(
        config.path(),
        &["--admin-token-file", token_file.to_str().expect("path")],
    )
    .await;
    // A tenant's URL pointing at the admin API's replay.
    write(
        config.path(),
        "webhooks.yaml",
        &webhook(
            "team-a",
            "replayer",
            &format!(
                "{{url: '{}/api/v1/deliveries/0190a0b0-0000-7000-8000-000000000000/replay'}}",
                herald.admin_url()
            ),
        ),
    );
    let log = herald.wait_log("applied=1", WAIT).await;
    assert!(
        log.lines().any(|l| l.contains("team-a/replayer")
            && l.contains("ForbiddenAddress")
            && l.contains("Herald's own listeners")),
        "{log}"
    );
    let authorized = |request: reqwest::RequestBuilder| request.bearer_auth("adm1n-t0ken");
    let client = reqwest::Client::new();
    let replay = format!(
        "{}/api/v1/deliveries/0190a0b0-0000-7000-8000-000000000000/replay",
        herald.admin_url()
    );
    let status = |request: reqwest::RequestBuilder| async move {
        request.send().await.expect("admin").status().as_u16()
    };
    // No token, a wrong token.
    assert_eq!(status(client.post(&replay)).await, 401);
    assert_eq!(status(client.post(&replay).bearer_auth("nope")).await, 401);
    // A page on evil.example whose name now resolves to 127.0.0.1 (DNS rebinding): its Host
    // and Origin give it away, and browsers can only send it a text or form body.
    let port = herald.admin.port();
    assert_eq!(
        status(authorized(client.post(&replay)).header("host", format!("evil.example:{port}")))
            .await,
        403
    );
    assert_eq!(
        status(authorized(client.post(&replay)).header("origin", "http://evil.example")).await,
        403
    );
    assert_eq!(
        status(
            authorized(client.post(&replay))
                .header("content-type", "text/plain")
                .body("x")
        )
        .await,
        415
    );
    // A request Herald itself sent.
    assert_eq!(
        status(authorized(client.post(&replay)).header("herald-delivery", "x")).await,
        403
    );
    // The admin's own call, as `kubectl port-forward` delivers it, reaches the API (which
    // knows no such delivery).
    assert_eq!(
        status(authorized(client.post(&replay)).header("host", format!("localhost:{port}"))).await,
        404
    );
    let listed = cli::herald(&[
        "deliveries",
        "--server",
        &herald.admin_url(),
        "--token-file",
        token_file.to_str().expect("path"),
    ]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
}

#[tokio::test]
async fn internal_addresses_in_every_spelling_are_refused_without_allow_loopback() {
    let sink = Sink::http().await;
    let port = sink.addr().port();
    let dir = tempfile::tempdir().expect("tempdir");
    let spellings = [
        ("mapped", format!("http://[::ffff:127.0.0.1]:{port}/")),
        ("compatible", format!("http://[::127.0.0.1]:{port}/")),
        ("decimal", format!("http://2130706433:{port}/")),
        ("hex", format!("http://0x7f.1:{port}/")),
        ("nat64", format!("http://[64:ff9b::7f00:1]:{port}/")),
        ("sixtofour", format!("http://[2002:7f00:1::1]:{port}/")),
        ("metadata", "http://[::ffff:169.254.169.254]/".to_string()),
        ("azure", "http://168.63.129.16/".to_string()),
        ("unspecified", format!("http://0.0.0.0:{port}/")),
    ];
    let manifests: String = spellings
        .iter()
        .map(|(name, url)| webhook("team-a", name, &format!("{{url: '{url}'}}")))
        .collect();
    write(dir.path(), "webhooks.yaml", &manifests);
    let herald = Running::start(dir.path(), &["--allow-loopback=false"]).await;
    let log = herald.log();
    for (name, _) in &spellings {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("team-a/{name}")) && l.contains("not ready"))
            .unwrap_or_else(|| panic!("{name} was not refused; log:\n{log}"));
        assert!(line.contains("ForbiddenAddress"), "{line}");
    }
    let (status, _) = herald
        .post_alerts(&payload(vec![alert(
            json!({"alertname": "A", "namespace": "team-a"}),
        )]))
        .await;
    assert_eq!(status, 200);
    sink.assert_none_within(Duration::from_millis(300)).await;
}

/// Names the system resolver answers, inside Herald's own mount namespace, from a hosts file.
const LINK_LOCAL_HOSTS: &str = "169.254.7.7 linklocal.herald.test\n\
                                fe80::7 linklocal6.herald.test\n\
                                127.0.0.1 sink.herald.test";

#[tokio::test]
async fn names_that_resolve_to_link_local_addresses_are_refused_at_connect_time() {
    let sink = Sink::http().await;
    let port = sink.addr().port();
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = [
        ("reachable", "sink.herald.test"),
        ("link-local", "linklocal.herald.test"),
        ("link-local-v6", "linklocal6.herald.test"),
    ];
    let manifests: String = hooks
        .iter()
        .map(|(name, host)| {
            webhook(
                "team-a",
                name,
                &format!("{{url: 'http://{host}:{port}/hook'}}"),
            )
        })
        .collect();
    write(dir.path(), "webhooks.yaml", &manifests);
    // `herald run` lets loopback through: the name for the sink shows the hosts file in use.
    let herald = Running::start_with_hosts(dir.path(), &[], LINK_LOCAL_HOSTS).await;
    let (status, body) = herald
        .post_alerts(&payload(vec![alert(
            json!({"alertname": "A", "namespace": "team-a"}),
        )]))
        .await;
    assert_eq!((status, &body["deliveries"]), (200, &json!(3)), "{body}");
    let arrived = sink.wait_for(1, WAIT).await;
    assert_eq!(
        arrived[0].header("host").as_deref(),
        Some(format!("sink.herald.test:{port}").as_str())
    );
    for (name, host) in &hooks[1..] {
        let record = first_record(&herald, &format!("team-a/{name}")).await;
        assert_eq!(record["outcome"], "Failed", "{record}");
        assert_eq!(
            record["attempts"], 1,
            "a refused address is final: {record}"
        );
        let error = record["error"].as_str().unwrap_or("");
        assert!(
            error.contains(&format!("{host} resolves only to refused addresses")),
            "{name}: {error}"
        );
    }
    assert_eq!(sink.count(), 1, "only the loopback name reached the sink");
}

#[tokio::test]
async fn credentials_echoed_in_encoded_forms_are_masked() {
    let token = "Sup3r-Secret/Token+42";
    let header_secret = "hdr-s3cret-value";
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let url_encoded: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
    let echoes = [
        token.to_string(),
        token.to_uppercase(),
        url_encoded.clone(),
        b64(token),
        b64(header_secret),
        header_secret.to_uppercase(),
    ];
    let sink = Sink::http().await;
    sink.respond_with(vec![
        Reply::status(401).body(json!({"error": format!("bad credentials: {}", echoes.join(" "))})),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "webhooks.yaml",
        &format!(
            "{}apiVersion: v1\nkind: Secret\nmetadata: {{name: auth}}\nstringData: {{token: '{token}'}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: headers}}\nstringData: {{X-Api-Key: '{header_secret}'}}\n",
            webhook(
                "default",
                "echo",
                &format!(
                    "{{url: '{}', auth: {{type: Bearer, secretRef: {{name: auth}}}}, headersSecretRef: {{name: headers}}}}",
                    sink.url()
                ),
            )
        ),
    );
    // Off the test's runtime thread, which serves the sink.
    let config = dir.path().to_str().expect("path").to_owned();
    let out =
        tokio::task::spawn_blocking(move || cli::herald(&["test", "echo", "--config", &config]))
            .await
            .expect("herald test");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{printed}");
    assert!(printed.contains("HTTP status 401"), "{printed}");
    assert!(printed.contains("[redacted]"), "{printed}");
    for echo in &echoes {
        assert!(!printed.contains(echo.as_str()), "{echo} leaked: {printed}");
    }
}

#[test]
fn the_chart_installs_an_authenticated_receiver_by_default() {
    let helm = control_plane::tool("helm").unwrap_or_else(|e| panic!("{e:#}"));
    let render = |extra: &[&str]| {
        let out = std::process::Command::new(&helm)
            .args(["template", "hd", "charts/herald", "-n", "herald"])
            .args(extra)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("helm");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("\n---")
            .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
            .filter(|doc| doc.is_object())
            .collect::<Vec<Value>>()
    };
    let of_kind = |docs: &[Value], kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let docs = render(&[]);
    let statefulset = of_kind(&docs, "StatefulSet");
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--receiver-token-file=/etc/herald/receiver-auth/token"),
        "{args:?}"
    );
    assert!(args.contains(&"--require-secret-consent"), "{args:?}");
    assert!(args.contains(&"--metrics-listen=0.0.0.0:9090"), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--allow-loopback")),
        "{args:?}"
    );
    // The token comes from a Secret the chart created, random and long.
    let secret = of_kind(&docs, "Secret");
    assert_eq!(secret["metadata"]["name"], "hd-herald-receiver-token");
    let token = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["token"].as_str().expect("token"))
        .expect("base64");
    assert!(token.len() >= 32, "{} bytes", token.len());
    let volumes = &statefulset["spec"]["template"]["spec"]["volumes"];
    assert!(
        volumes
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["secret"]["secretName"] == "hd-herald-receiver-token"),
        "{volumes}"
    );
    // An existing Secret instead: nothing created, that one mounted.
    let docs = render(&["--set", "receiverAuth.existingSecret=mine"]);
    assert!(!docs.iter().any(|d| d["kind"] == "Secret"));
    // Turning it off is explicit.
    let docs = render(&["--set", "receiverAuth.enabled=false"]);
    let statefulset = of_kind(&docs, "StatefulSet");
    let args = &statefulset["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        !args.to_string().contains("--receiver-token-file"),
        "{args}"
    );
}
