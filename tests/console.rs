//! The web console in a real browser (Debian's Chromium driven through chromedriver) against
//! the real API server, `herald controller` and `herald run` processes and a loopback sink.
//!
//! With `HERALD_UPDATE_SCREENSHOTS=1` the tests also save a screenshot of each page, in English
//! and Simplified Chinese, under `docs/console/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use herald::crd::Webhook;
use herald_testkit::{cli, cluster, process, sink};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::{Value, json};
use sink::Sink;

const WAIT: Duration = Duration::from_secs(30);

fn find_program(names: &[&str]) -> PathBuf {
    for name in names {
        for dir in ["/usr/bin", "/usr/lib/chromium", "/usr/local/bin"] {
            let path = Path::new(dir).join(name);
            if path.exists() {
                return path;
            }
        }
    }
    panic!(
        "none of {names:?} is installed: run hack/install-packages.sh (Debian packages chromium and chromium-driver)"
    );
}

/// A headless Chromium session through chromedriver; every page source it saw is kept so
/// tests can check what never appears in one.
struct Browser {
    driver: Child,
    client: Client,
    base: String,
    sources: Vec<String>,
}

impl Browser {
    async fn start(base: &str) -> Browser {
        let chromedriver = find_program(&["chromedriver"]);
        let chromium = find_program(&["chromium", "chromium-browser"]);
        let port = process::free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1500,1100", "--lang=en-US", "--font-render-hinting=none"],
                "prefs": {"intl.accept_languages": "en-US,en"},
            }),
        );
        let deadline = Instant::now() + WAIT;
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => break client,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "chromedriver never answered: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Browser {
            driver,
            client,
            base: base.trim_end_matches('/').to_string(),
            sources: Vec::new(),
        }
    }

    async fn goto(&mut self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
        self.remember().await;
    }

    async fn remember(&mut self) {
        if let Ok(source) = self.client.source().await {
            self.sources.push(source);
        }
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => {
                let url = self
                    .client
                    .current_url()
                    .await
                    .map(|u| u.to_string())
                    .unwrap_or_default();
                let source = self.client.source().await.unwrap_or_default();
                panic!("no element {css} ({e}) on {url}:\n{source}")
            }
        }
    }

    async fn exists(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
            .is_empty()
    }

    async fn click(&mut self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
        tokio::time::sleep(Duration::from_millis(150)).await;
        self.remember().await;
    }

    async fn fill(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        element.clear().await.expect("clear");
        element.send_keys(text).await.expect("type");
    }

    async fn select(&self, css: &str, value: &str) {
        self.find(css)
            .await
            .select_by_value(value)
            .await
            .unwrap_or_else(|e| panic!("selecting {value} in {css}: {e}"));
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("text")
    }

    /// Waits until the element's text satisfies `check`.
    async fn wait_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never became {what}; last text {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn path(&self) -> String {
        let url = self.client.current_url().await.expect("url");
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    async fn source(&self) -> String {
        self.client.source().await.expect("source")
    }

    /// Saves a screenshot of the current page as `docs/console/<name>-<lang>.png` when asked to.
    async fn screenshot(&mut self, name: &str) {
        if std::env::var_os("HERALD_UPDATE_SCREENSHOTS").is_none() {
            return;
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console");
        std::fs::create_dir_all(&dir).expect("docs/console");
        let here = self.path().await;
        for (lang, tag) in [("en", "en"), ("zh-CN", "zh-CN")] {
            self.goto(&format!("/lang/{tag}?next={}", urlencode(&here)))
                .await;
            let png = self.client.screenshot().await.expect("screenshot");
            std::fs::write(dir.join(format!("{name}-{lang}.png")), png).expect("write png");
        }
        self.goto(&format!("/lang/en?next={}", urlencode(&here)))
            .await;
    }

    async fn sign_in(&mut self, token: &str) {
        self.goto("/").await;
        self.fill("#token", token).await;
        self.click("#sign-in").await;
        self.find("#webhooks, #empty").await;
    }

    fn assert_never_shown(&self, secret: &str) {
        assert!(!self.sources.is_empty());
        for source in &self.sources {
            assert!(
                !source.contains(secret),
                "a page showed a stored credential:\n{source}"
            );
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Every element matched is disabled.
async fn all_disabled(browser: &Browser, css: &str) -> bool {
    let elements = browser
        .client
        .find_all(Locator::Css(css))
        .await
        .expect("find");
    assert!(!elements.is_empty(), "no {css}");
    for element in elements {
        if element.is_enabled().await.expect("enabled") {
            return false;
        }
    }
    true
}

/// Service accounts for the browser's users: `admin` may do everything with webhooks,
/// conditions and Secrets in `namespace`, `reader` may only read. Returns their tokens.
fn users(namespace: &str) -> (String, String) {
    cluster::apply(&format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: console-admin, namespace: {namespace}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: console-reader, namespace: {namespace}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: webhook-editor, namespace: {namespace}}}
rules:
  - apiGroups: [herald.dev]
    resources: [webhooks, notificationconditions]
    verbs: [get, list, watch, create, update, patch, delete]
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get, create, update, patch, delete]
  - apiGroups: [""]
    resources: [events]
    verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: webhook-reader, namespace: {namespace}}}
rules:
  - apiGroups: [herald.dev]
    resources: [webhooks, notificationconditions]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [events]
    verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: console-admin, namespace: {namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: webhook-editor}}
subjects: [{{kind: ServiceAccount, name: console-admin, namespace: {namespace}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: console-reader, namespace: {namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: webhook-reader}}
subjects: [{{kind: ServiceAccount, name: console-reader, namespace: {namespace}}}]
"#
    ));
    let token = |account: &str| {
        let out = cluster::kubectl(&["create", "token", account, "-n", namespace]);
        assert!(
            out.status.success(),
            "kubectl create token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    (token("console-admin"), token("console-reader"))
}

fn kubectl_json(args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = cluster::kubectl(&all);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("kubectl json"))
}

/// Waits until `kubectl get` shows what `check` wants.
async fn wait_kubectl(
    args: &[&str],
    what: &str,
    check: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = kubectl_json(args);
        if check(value.as_ref()) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl get {args:?} never showed {what}; last {value:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fills the Add form: a Bearer webhook with one condition row.
async fn fill_new_webhook(
    browser: &mut Browser,
    namespace: &str,
    name: &str,
    url: &str,
    token: &str,
) {
    browser
        .goto(&format!("/webhooks?namespace={namespace}"))
        .await;
    browser.click("#add-webhook").await;
    browser.fill("#namespace", namespace).await;
    browser.fill("#name", name).await;
    browser.fill("#url", url).await;
    browser.select("#language", "zh-CN").await;
    browser.select("#auth", "Bearer").await;
    browser.fill("#secret", token).await;
    browser.click("#add-row").await;
    browser
        .fill(".condition-row:last-child .row-key", "severity")
        .await;
    browser
        .select(".condition-row:last-child .row-operator", "In")
        .await;
    browser
        .fill(".condition-row:last-child .row-values", "critical")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_user_manages_a_webhook_through_the_console() {
    let ns = "console-admin-flow";
    let client = cluster::client().await;
    cluster::namespace(&client, ns).await;
    let (admin, _reader) = users(ns);
    let console_port = process::free_port();
    let controller = cluster::Controller::start(
        "console-admin",
        &[ns],
        &["--console-listen", &format!("127.0.0.1:{console_port}")],
    )
    .await;
    let base = format!("http://127.0.0.1:{console_port}");
    let sink = Sink::http().await;
    let bearer = "s3cr3t-bearer-0f-the-endpoint";

    // Without a session: the sign-in page, never data.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http");
    let home = http.get(format!("{base}/")).send().await.expect("GET /");
    assert_eq!(home.status(), 200);
    let csp = home
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let body = home.text().await.expect("body");
    assert!(
        body.contains("id=\"token\"") && !body.contains("id=\"webhooks\""),
        "{body}"
    );
    let list = http
        .get(format!("{base}/webhooks"))
        .send()
        .await
        .expect("GET /webhooks");
    assert_eq!(list.status(), 303, "no data without a session");

    let mut browser = Browser::start(&base).await;
    browser.goto("/").await;
    browser.screenshot("sign-in").await;
    browser.fill("#token", "not-a-valid-token").await;
    browser.click("#sign-in").await;
    browser.find("#sign-in-error").await;
    browser.sign_in(&admin).await;
    let cookie = browser
        .client
        .get_named_cookie(auth_cookie())
        .await
        .expect("session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");

    // Add through the form, Send test before saving, then Submit.
    browser.goto(&format!("/webhooks/new?namespace={ns}")).await;
    browser.screenshot("add-form").await;
    fill_new_webhook(&mut browser, ns, "ops", &sink.url(), bearer).await;
    browser.click("#send-test").await;
    let outcome = browser
        .wait_text("#test-outcome", "a test outcome", |t| !t.is_empty())
        .await;
    assert_eq!(outcome, "Succeeded", "{}", browser.source().await);
    assert_eq!(browser.text("#test-status").await, "200");
    let tested = sink.wait_for(1, WAIT).await;
    assert_eq!(
        tested[0].header("authorization").as_deref(),
        Some(format!("Bearer {bearer}").as_str())
    );
    assert!(
        kubectl_json(&["get", "webhooks.herald.dev", "ops", "-n", ns]).is_none(),
        "Send test saves nothing"
    );
    browser.click("#submit").await;
    browser.find("#spec").await;
    assert!(
        browser
            .path()
            .await
            .starts_with(&format!("/webhooks/{ns}/ops"))
    );
    let webhook = wait_kubectl(
        &["get", "webhooks.herald.dev", "ops", "-n", ns],
        "the webhook",
        |v| v.is_some(),
    )
    .await
    .expect("webhook");
    assert_eq!(
        webhook["spec"]["auth"],
        json!({"type": "Bearer", "secretRef": {"name": "ops-auth"}})
    );
    assert_eq!(webhook["spec"]["conditions"], json!(["ops-conditions"]));
    assert_eq!(webhook["spec"]["language"], "zh-CN");
    let uid = webhook["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get("ops-auth")
        .await
        .expect("the credentials Secret");
    assert_eq!(
        secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("herald.dev/use"))
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        secret.metadata.owner_references.as_ref().expect("owner")[0].uid,
        uid
    );
    let condition = kubectl_json(&[
        "get",
        "notificationconditions.herald.dev",
        "ops-conditions",
        "-n",
        ns,
    ])
    .expect("condition");
    assert_eq!(
        condition["spec"]["matchExpressions"],
        json!([{"key": "severity", "operator": "In", "values": ["critical"]}])
    );
    assert_eq!(
        condition["metadata"]["ownerReferences"][0]["uid"],
        uid.as_str()
    );
    // The API server's own refusal comes back next to its field.
    fill_new_webhook(&mut browser, ns, "ops", &sink.url(), bearer).await;
    browser.click("#submit").await;
    let refusal = browser.text("#error-name").await;
    assert!(refusal.contains("already exists"), "{refusal}");
    let out = cluster::kubectl(&["get", "webhooks", "-n", ns]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ops"));

    // A real alert reaches it.
    cluster::wait_webhook(&client, ns, "ops", "Ready", |w| {
        cluster::ready_is(w, "True", "Ready")
    })
    .await;
    sink.clear();
    controller
        .post_until_delivered(
            json!({"alertname": "DiskFull", "severity": "critical", "namespace": ns}),
            1,
        )
        .await;
    let delivered = sink.wait_for(1, WAIT).await;
    assert!(delivered[0].text().contains("DiskFull"));
    assert_eq!(
        delivered[0].header("authorization").as_deref(),
        Some(format!("Bearer {bearer}").as_str())
    );
    browser.goto(&format!("/webhooks/{ns}/ops")).await;
    browser.screenshot("detail").await;

    // Disable and enable from the list.
    browser.goto(&format!("/webhooks?namespace={ns}")).await;
    browser.screenshot("webhooks").await;
    browser.click(&format!("#row-{ns}-ops .disable")).await;
    wait_kubectl(
        &["get", "webhooks.herald.dev", "ops", "-n", ns],
        "disabled",
        |v| v.is_some_and(|v| v["spec"]["enabled"] == false),
    )
    .await;
    browser.click(&format!("#row-{ns}-ops .enable")).await;
    wait_kubectl(
        &["get", "webhooks.herald.dev", "ops", "-n", ns],
        "enabled",
        |v| v.is_some_and(|v| v["spec"]["enabled"] == true),
    )
    .await;

    // Modify the URL, leaving the token empty: the stored one stays.
    browser.click(&format!("#row-{ns}-ops .modify")).await;
    browser.find("#credential-kept").await;
    assert_eq!(
        browser
            .find("#secret")
            .await
            .prop("value")
            .await
            .expect("value")
            .as_deref(),
        Some("")
    );
    browser.screenshot("modify-form").await;
    let new_url = sink.url_for("/moved");
    browser.fill("#url", &new_url).await;
    browser.click("#submit").await;
    browser.find("#spec").await;
    wait_kubectl(
        &["get", "webhooks.herald.dev", "ops", "-n", ns],
        "the new URL",
        |v| v.is_some_and(|v| v["spec"]["url"] == new_url.as_str()),
    )
    .await;
    let kept = secrets.get("ops-auth").await.expect("secret");
    assert_eq!(
        kept.data
            .as_ref()
            .and_then(|d| d.get("token"))
            .map(|t| t.0.clone()),
        Some(bearer.as_bytes().to_vec())
    );

    // Send test from the list: the controller answers in status.lastTest.
    browser.goto(&format!("/webhooks?namespace={ns}")).await;
    browser.click(&format!("#row-{ns}-ops .send-test")).await;
    browser.find("#notice").await;
    wait_kubectl(
        &["get", "webhooks.herald.dev", "ops", "-n", ns],
        "a test result",
        |v| v.is_some_and(|v| v["status"]["lastTest"]["outcome"] == "Succeeded"),
    )
    .await;
    browser.goto(&format!("/webhooks/{ns}/ops")).await;
    browser
        .wait_text("#last-test", "the test result", |t| t.contains("Succeeded"))
        .await;
    // The Events about the webhook (the controller's test result) are shown, read as the user.
    let deadline = Instant::now() + WAIT;
    loop {
        browser.goto(&format!("/webhooks/{ns}/ops")).await;
        let events = browser.text("#events").await;
        if events.contains("TestSucceeded") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no TestSucceeded Event shown: {events}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The conditions list and the routing preview.
    browser.goto("/conditions").await;
    assert!(
        browser
            .text("#condition-list")
            .await
            .contains("ops-conditions")
    );
    browser.screenshot("conditions").await;
    browser.goto("/routing").await;
    browser
        .fill(
            "#payload",
            &json!([{"labels": {"alertname": "DiskFull", "severity": "warning", "namespace": ns}}])
                .to_string(),
        )
        .await;
    browser.click("#preview").await;
    let result = browser.text("#routing-result").await;
    assert!(result.contains(&format!("{ns}/ops")), "{result}");
    assert!(browser.exists(".not-reached").await, "{result}");
    browser.screenshot("routing").await;

    // Delete asks first, and says it cannot be undone.
    browser.goto(&format!("/webhooks?namespace={ns}")).await;
    browser.click(&format!("#row-{ns}-ops .delete")).await;
    assert!(
        browser
            .text("#delete-warning")
            .await
            .contains("cannot be undone")
    );
    browser.screenshot("delete").await;
    assert!(kubectl_json(&["get", "webhooks.herald.dev", "ops", "-n", ns]).is_some());
    browser.click("#confirm-delete").await;
    wait_kubectl(
        &["get", "webhooks.herald.dev", "ops", "-n", ns],
        "deleted",
        |v| v.is_none(),
    )
    .await;
    wait_kubectl(
        &["get", "secret", "ops-auth", "-n", ns],
        "the Secret deleted",
        |v| v.is_none(),
    )
    .await;

    browser.assert_never_shown(bearer);
    let raw = http
        .get(format!("{base}/webhooks?namespace={ns}"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("GET with Authorization");
    assert_eq!(
        raw.status(),
        200,
        "an authenticating proxy's Authorization header signs in"
    );
    drop(controller);
}

fn auth_cookie() -> &'static str {
    herald::console::auth::SESSION_COOKIE
}

/// A page on another origin holding a form that posts to the console.
async fn hostile_site(target: &str) -> (String, tokio::task::JoinHandle<()>) {
    let page = format!(
        r#"<!doctype html><html><body><form method="post" action="{target}">
<input type="hidden" name="csrf" value="guessed"><button id="go" type="submit">win a prize</button></form></body></html>"#
    );
    let router = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://localhost:{}", address.port()), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_user_and_hostile_input_change_nothing() {
    let ns = "console-read-only";
    let client = cluster::client().await;
    cluster::namespace(&client, ns).await;
    let (admin, reader) = users(ns);
    let sink = Sink::http().await;
    sink.respond_with(vec![sink::Reply::status(500)]);
    cluster::apply(&format!(
        r#"
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {{name: audited, namespace: {ns}}}
spec: {{type: Alarms, url: "{}", enabled: true}}
"#,
        sink.url()
    ));
    let console_port = process::free_port();
    let controller = cluster::Controller::start(
        "console-read-only",
        &[ns],
        &[
            "--console-listen",
            &format!("127.0.0.1:{console_port}"),
            "--retry-max-attempts",
            "1",
        ],
    )
    .await;
    let base = format!("http://127.0.0.1:{console_port}");
    cluster::wait_webhook(&client, ns, "audited", "Ready", |w| {
        cluster::ready_is(w, "True", "Ready")
    })
    .await;

    // An alert whose labels carry markup becomes a dead letter (the sink fails), which keeps it.
    let script = "<script>window.pwned=1</script>";
    let image = "\"><img src=x onerror=window.pwned=2>";
    controller
        .post_until_delivered(
            json!({"alertname": script, "namespace": ns, "note": image}),
            1,
        )
        .await;
    let api: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + WAIT;
    while api
        .get("audited")
        .await
        .expect("get")
        .status
        .and_then(|s| s.last_delivery)
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the failing delivery never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut browser = Browser::start(&base).await;
    browser.sign_in(&reader).await;
    browser.goto(&format!("/webhooks?namespace={ns}")).await;
    browser.find(&format!("#row-{ns}-audited")).await;
    for action in [".modify", ".disable", ".send-test", ".delete"] {
        assert!(
            all_disabled(&browser, &format!("#row-{ns}-audited {action}")).await,
            "{action} must be disabled for a reader"
        );
    }
    assert!(all_disabled(&browser, "#add-webhook").await);
    browser.screenshot("read-only").await;

    // A forged request (the disabled button re-enabled) gets the API server's 403.
    browser
        .client
        .execute(
            "document.querySelectorAll('button[disabled]').forEach(b => b.disabled = false);",
            vec![],
        )
        .await
        .expect("re-enable buttons");
    browser.click(&format!("#row-{ns}-audited .disable")).await;
    let refusal = browser.text("#error-message").await;
    assert!(
        refusal.contains("forbidden") || refusal.contains("may not"),
        "{refusal}"
    );
    assert!(browser.text("h1").await.contains("403"));
    let webhook = api.get("audited").await.expect("get");
    assert!(webhook.spec.enabled, "the forged request changed nothing");

    // Markup from alert labels is shown as text, never run.
    browser.goto("/routing").await;
    browser.click("#recent-alert option:nth-child(2)").await;
    browser.click("#preview").await;
    let shown = browser.text("#routing-result").await;
    assert!(shown.contains(script), "{shown}");
    assert!(shown.contains(image), "{shown}");
    assert!(
        !browser.exists("#routing-result img").await
            && !browser.exists("#routing-result script").await
    );
    let pwned = browser
        .client
        .execute("return window.pwned === undefined;", vec![])
        .await
        .expect("execute");
    assert_eq!(pwned, json!(true), "markup in alert labels ran");
    browser.goto(&format!("/webhooks/{ns}/audited")).await;
    assert!(browser.text("#dead-letters").await.contains("Failed"));
    let pwned = browser
        .client
        .execute("return window.pwned === undefined;", vec![])
        .await
        .expect("execute");
    assert_eq!(pwned, json!(true));

    // A form on another site cannot post to the console.
    let (site, server) = hostile_site(&format!("{base}/webhooks/{ns}/audited/disable")).await;
    browser.client.goto(&site).await.expect("hostile site");
    browser.click("#go").await;
    let answer = browser.source().await;
    assert!(
        answer.contains("refused") || answer.contains("sign in"),
        "{answer}"
    );
    assert!(api.get("audited").await.expect("get").spec.enabled);
    server.abort();

    // Replay of a dead letter: disabled for the reader, done for a user who may update it.
    browser.goto(&format!("/webhooks/{ns}/audited")).await;
    assert!(all_disabled(&browser, "#dead-letters .replay").await);
    browser.click("#sign-out").await;
    browser.find("#token").await;
    browser.sign_in(&admin).await;
    sink.respond_with(Vec::new());
    let before = sink.count();
    browser.goto(&format!("/webhooks/{ns}/audited")).await;
    browser.click("#dead-letters .replay").await;
    assert!(browser.text("#notice").await.contains("Replay"));
    let replayed = sink.wait_for(before + 1, WAIT).await;
    assert!(
        replayed[before].text().contains("window.pwned"),
        "the replay carries the dead letter's alert"
    );
    drop(controller);
}

/// Reloads the list until a row's Ready column starts with `status` (the folder is reloaded
/// on its own schedule).
async fn wait_ready_shown(browser: &mut Browser, css: &str, status: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        browser.goto("/webhooks").await;
        let text = browser.text(css).await;
        if text.starts_with(status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{css} never showed {status}; last {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_of_herald_run_edits_the_config_folder() {
    let config = tempfile::tempdir().expect("config");
    let secrets = tempfile::tempdir().expect("secrets");
    let token_file = secrets.path().join("console-token");
    let console_token = "console-t0ken-of-the-folder";
    std::fs::write(&token_file, format!("{console_token}\n")).expect("token");
    let sink = Sink::http().await;
    std::fs::write(
        config.path().join("existing.yaml"),
        format!(
            "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: existing}}\nspec: {{type: Alarms, url: \"{}\"}}\n",
            sink.url_for("/existing")
        ),
    )
    .expect("manifest");
    let console_port = process::free_port();
    let herald = cli::Running::start(
        config.path(),
        &[
            "--console-listen",
            &format!("127.0.0.1:{console_port}"),
            "--console-token-file",
            token_file.to_str().expect("path"),
        ],
    )
    .await;
    let base = format!("http://127.0.0.1:{console_port}");

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http");
    assert_eq!(
        http.get(format!("{base}/webhooks"))
            .send()
            .await
            .expect("get")
            .status(),
        303
    );
    assert_eq!(
        http.get(format!("{base}/webhooks"))
            .bearer_auth("wrong")
            .send()
            .await
            .expect("get")
            .status(),
        401,
        "a wrong console token is refused"
    );
    let scripted = http
        .get(format!("{base}/webhooks"))
        .bearer_auth(console_token)
        .send()
        .await
        .expect("get");
    assert_eq!(scripted.status(), 200);
    assert!(scripted.text().await.expect("body").contains("existing"));

    let mut browser = Browser::start(&base).await;
    browser.goto("/").await;
    browser.fill("#token", "wrong").await;
    browser.click("#sign-in").await;
    browser.find("#sign-in-error").await;
    browser.sign_in(console_token).await;
    assert!(browser.text("#webhooks").await.contains("existing"));

    let password = "basic-pa55word-of-the-endpoint";
    browser.click("#add-webhook").await;
    browser.fill("#name", "ops").await;
    browser.fill("#url", &sink.url()).await;
    browser.select("#auth", "Basic").await;
    browser.fill("#username", "herald").await;
    browser.fill("#secret", password).await;
    browser.click("#add-row").await;
    browser
        .fill(".condition-row:last-child .row-key", "severity")
        .await;
    browser
        .select(".condition-row:last-child .row-operator", "Exists")
        .await;
    browser.click("#send-test").await;
    let outcome = browser
        .wait_text("#test-outcome", "a test outcome", |t| !t.is_empty())
        .await;
    assert_eq!(outcome, "Succeeded");
    let tested = sink.wait_for(1, WAIT).await;
    assert!(
        tested[0]
            .header("authorization")
            .is_some_and(|a| a.starts_with("Basic "))
    );
    let file = config.path().join("default.ops.yaml");
    assert!(!file.exists(), "Send test saves nothing");
    browser.click("#submit").await;
    browser.find("#spec").await;
    let text = std::fs::read_to_string(&file).expect("the console's manifest");
    assert!(
        text.contains("kind: Webhook")
            && text.contains("kind: Secret")
            && text.contains("kind: NotificationCondition"),
        "{text}"
    );
    assert!(text.contains("herald.dev/use"), "{text}");

    // The reload picks it up: a real alert reaches it.
    sink.clear();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, reply) = herald
            .post_alerts(&json!({"version": "4", "status": "firing", "receiver": "herald", "groupLabels": {},
                "commonLabels": {}, "commonAnnotations": {}, "externalURL": "",
                "alerts": [{"status": "firing", "labels": {"alertname": "DiskFull", "severity": "critical"}}]}))
            .await;
        assert_eq!(status, 200);
        if reply["deliveries"].as_u64().unwrap_or(0) >= 1
            && sink
                .received()
                .iter()
                .any(|r| r.path != "/existing" && r.text().contains("DiskFull"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console's webhook never got the alert: {reply}\n{}",
            herald.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Disable, enable, modify the URL (password kept), delete: each in the file.
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    browser.goto("/webhooks").await;
    browser.click("#row-default-ops .disable").await;
    assert!(read().contains("enabled: false"), "{}", read());
    wait_ready_shown(&mut browser, "#row-default-ops .ready", "False").await;
    browser.click("#row-default-ops .enable").await;
    assert!(read().contains("enabled: true"), "{}", read());
    wait_ready_shown(&mut browser, "#row-default-ops .ready", "True").await;
    browser.click("#row-default-ops .send-test").await;
    browser
        .wait_text("#test-outcome", "a test outcome", |t| t == "Succeeded")
        .await;
    browser.click("#row-default-ops .modify").await;
    let moved = sink.url_for("/moved");
    browser.fill("#url", &moved).await;
    browser.click("#submit").await;
    browser.find("#spec").await;
    let text = read();
    assert!(text.contains(&moved) && text.contains(password), "{text}");
    browser.goto("/webhooks").await;
    browser.click("#row-default-ops .delete").await;
    browser.click("#confirm-delete").await;
    browser.find("#notice").await;
    assert!(!file.exists(), "the webhook's file is gone");
    assert!(
        config.path().join("existing.yaml").exists(),
        "other manifests stay"
    );

    browser.assert_never_shown(password);
    browser.assert_never_shown(console_token);
    drop(herald);
}
