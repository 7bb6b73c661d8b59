//! The install artefacts against a real API server: `deploy/` (kustomize and plain `-f`), the
//! Helm chart in `charts/herald/` (lint, schema, rendering, applying what it renders), the RBAC
//! they grant (exactly the controller's verbs, checked with `kubectl auth can-i` and by running
//! `herald controller` as the ServiceAccount), and the CRD copies they ship.
//!
//! Needs `hack/build-tools.sh` (kube-apiserver, etcd, kubectl, helm); a missing tool fails the
//! tests, it never skips them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use herald_testkit::control_plane;
use herald_testkit::process::{Process, free_ports};
use serde_json::{Value, json};

/// The ServiceAccount `deploy/` creates, as the API server names it.
const SERVICE_ACCOUNT: &str = "system:serviceaccount:herald:herald";

/// How long a wait on the API server or the controller may take.
const WAIT: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `tool args`, with `stdin` when given, and returns its output whatever the exit status.
fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let bin = control_plane::tool(tool).unwrap_or_else(|e| panic!("{e:#}"));
    let mut child = Command::new(&bin)
        .args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing to {tool}'s stdin: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {tool}: {e}"))
}

/// Runs `tool args` and returns its stdout; panics with stderr unless it succeeds.
fn ok(tool: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(tool, args, stdin);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `kubectl --kubeconfig <kubeconfig> args`, which must succeed; its stdout.
fn kubectl_on(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let kubeconfig = kubeconfig.to_str().expect("UTF-8 kubeconfig path");
    let mut all = vec!["--kubeconfig", kubeconfig, "--request-timeout=30s"];
    all.extend_from_slice(args);
    ok("kubectl", &all, stdin)
}

/// `kubectl` against the shared plane of this test binary.
fn kubectl(args: &[&str]) -> String {
    kubectl_on(&control_plane::shared().kubeconfig, args, None)
}

fn kubectl_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["-o", "json"]);
    let out = kubectl(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?} -o json: {e}\n{out}"))
}

/// The documents of a YAML stream that hold an object: each one's text and its value.
fn documents(yaml: &str) -> Vec<(String, Value)> {
    let mut texts = vec![String::new()];
    for line in yaml.lines() {
        if line.trim_end() == "---" {
            texts.push(String::new());
        } else {
            let current = texts.last_mut().expect("one document at least");
            current.push_str(line);
            current.push('\n');
        }
    }
    texts
        .into_iter()
        .filter_map(|text| {
            let value: Value = serde_saphyr::from_str(&text)
                .unwrap_or_else(|e| panic!("parsing YAML: {e}\n{text}"));
            value.is_object().then_some((text, value))
        })
        .collect()
}

/// Every object in a stream of YAML documents (comments and empty documents dropped).
fn objects(yaml: &str) -> Vec<Value> {
    documents(yaml)
        .into_iter()
        .map(|(_, value)| value)
        .collect()
}

fn read(path: &str) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `kind/namespace/name` of an object (`-` for cluster-scoped ones).
fn identity(object: &Value) -> String {
    format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["namespace"].as_str().unwrap_or("-"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, got {}",
        found.len()
    );
    found[0]
}

/// The value at a JSON pointer, or a panic naming the path and the object.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} is missing in {value:#}"))
}

/// Where the StatefulSet's `--data-dir` points: the mount path of its `data` volume.
const DATA_DIR: &str = "/var/lib/herald";

/// A `herald controller` command line as (flag, value) pairs in order: `--flag=value` and
/// `--flag value` read alike, a flag without a value gets "".
fn flags(args: &Value) -> Vec<(String, String)> {
    let args: Vec<&str> = args
        .as_array()
        .unwrap_or_else(|| panic!("args are a list: {args}"))
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    assert_eq!(args.first(), Some(&"controller"), "{args:?}");
    let mut pairs = Vec::new();
    let mut rest = args[1..].iter().peekable();
    while let Some(arg) = rest.next() {
        assert!(arg.starts_with("--"), "{arg:?} is not a flag: {args:?}");
        let pair = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), value.to_owned()),
            None => {
                let value = rest.next_if(|next| !next.starts_with("--"));
                (arg.to_string(), value.map_or("", |v| v).to_owned())
            }
        };
        pairs.push(pair);
    }
    pairs
}

/// Checks a StatefulSet that runs with a durable delivery store: its root filesystem is
/// read-only, so `--data-dir` must name exactly the mount path of a writable volume, the volume
/// `data`, writable by the non-root user through fsGroup; and the admin listener stays on
/// loopback. Returns that volume: the pod's volume `data`, or, when the pods have none, the
/// volumeClaimTemplate `data` as `{"name": "data", "claim": {accessModes, storage}}` (plus
/// `storageClassName` when set).
fn data_volume(workload: &Value) -> Value {
    let pod = at(workload, "/spec/template/spec");
    let container = at(pod, "/containers/0");
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"], true,
        "{container:#}"
    );
    let flags = flags(&container["args"]);
    let dirs: Vec<&str> = flags
        .iter()
        .filter(|(flag, _)| flag == "--data-dir")
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(dirs, [DATA_DIR], "{flags:?}");
    for (_, listen) in flags.iter().filter(|(flag, _)| flag == "--admin-listen") {
        let address: std::net::SocketAddr = listen.parse().expect("an --admin-listen address");
        assert!(address.ip().is_loopback(), "--admin-listen={listen}");
    }
    let mounts: Vec<&Value> = container["volumeMounts"]
        .as_array()
        .unwrap_or_else(|| panic!("no volumeMounts: {container:#}"))
        .iter()
        .filter(|m| m["mountPath"] == DATA_DIR)
        .collect();
    assert_eq!(
        mounts.len(),
        1,
        "one volume mounted at {DATA_DIR}: {container:#}"
    );
    let mount = mounts[0];
    assert_eq!(mount["name"], "data", "{mount}");
    assert!(
        mount.get("readOnly").is_none_or(|r| r == false) && mount.get("subPath").is_none(),
        "{mount}"
    );
    assert_eq!(at(pod, "/securityContext/fsGroup"), 65532);
    let volumes: Vec<&Value> = pod
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v["name"] == "data")
        .collect();
    let claims: Vec<&Value> = workload["spec"]
        .get("volumeClaimTemplates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v["metadata"]["name"] == "data")
        .collect();
    assert_eq!(
        volumes.len() + claims.len(),
        1,
        "one volume or claim template named data: {workload:#}"
    );
    if let Some(volume) = volumes.first() {
        return (*volume).clone();
    }
    let spec = at(claims[0], "/spec");
    let mut claim = json!({
        "accessModes": spec["accessModes"],
        "storage": at(spec, "/resources/requests/storage"),
    });
    if let Some(class) = spec.get("storageClassName") {
        claim["storageClassName"] = class.clone();
    }
    json!({"name": "data", "claim": claim})
}

/// The claim template every replica gets by default: its own 1Gi volume.
fn default_claim() -> Value {
    json!({"name": "data", "claim": {"accessModes": ["ReadWriteOnce"], "storage": "1Gi"}})
}

/// The manifests in `deploy/` that `kubectl apply -f deploy/` reads (.yaml, .yml, .json).
fn deploy_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .expect("reading deploy/")
        .map(|e| e.expect("deploy/ entry").path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    files
}

/// Applies `deploy/` to the shared plane with `kubectl apply --server-side -k`, once per test
/// binary; every test that needs the installed objects calls this first.
fn deployed() {
    static APPLIED: OnceLock<Result<String, String>> = OnceLock::new();
    let result = APPLIED.get_or_init(|| {
        let plane = control_plane::shared();
        let out = run(
            "kubectl",
            &[
                "--kubeconfig",
                plane.kubeconfig.to_str().expect("UTF-8 kubeconfig path"),
                "apply",
                "--server-side",
                "-k",
                "deploy/",
            ],
            None,
        );
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(format!(
                "kubectl apply --server-side -k deploy/ failed ({}):\n{}{}",
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            ))
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The objects `deploy/` installs.
const DEPLOY_OBJECTS: &[&str] = &[
    "namespace/herald",
    "customresourcedefinition.apiextensions.k8s.io/webhooks.herald.dev",
    "customresourcedefinition.apiextensions.k8s.io/notificationconditions.herald.dev",
    "serviceaccount/herald",
    "clusterrole.rbac.authorization.k8s.io/herald",
    "clusterrolebinding.rbac.authorization.k8s.io/herald",
    "role.rbac.authorization.k8s.io/herald-leader-election",
    "rolebinding.rbac.authorization.k8s.io/herald-leader-election",
    "statefulset.apps/herald",
    "service/herald",
    "poddisruptionbudget.policy/herald",
];

#[test]
fn deploy_applies_with_kustomize_and_every_object_exists() {
    deployed();
    let mut args = vec!["get", "-n", "herald"];
    args.extend_from_slice(DEPLOY_OBJECTS);
    args.extend_from_slice(&["-o", "name"]);
    let listed: BTreeSet<String> = kubectl(&args).lines().map(str::to_owned).collect();
    let expected: BTreeSet<String> = DEPLOY_OBJECTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, expected);

    // The API server itself establishes CRDs (no controller-manager needed).
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/webhooks.herald.dev",
        "crd/notificationconditions.herald.dev",
    ]);

    let statefulset = kubectl_json(&["get", "-n", "herald", "statefulset/herald"]);
    let spec = at(&statefulset, "/spec");
    assert_eq!(spec["replicas"], 2);
    // Each replica's store on a claim of its own, kept when the pod goes (a rollout, a drain)
    // and when the StatefulSet scales down; replaced one pod at a time.
    assert_eq!(spec["serviceName"], "herald");
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert!(
        spec["updateStrategy"]
            .pointer("/rollingUpdate/partition")
            .is_none_or(|p| p == 0),
        "every pod is updated: {spec:#}"
    );
    assert_eq!(
        spec["persistentVolumeClaimRetentionPolicy"],
        json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
    );
    let pod = at(spec, "/template/spec");
    assert_eq!(pod["serviceAccountName"], "herald");
    // Time to deliver after SIGTERM: --shutdown-timeout is 10 s less.
    assert_eq!(pod["terminationGracePeriodSeconds"], 60);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let containers = at(pod, "/containers").as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], "ghcr.io/herald-dev/herald:0.1.0");
    assert_eq!(
        c["args"],
        json!([
            "controller",
            "--log-format",
            "json",
            "--metrics-listen",
            "0.0.0.0:9090",
            "--require-secret-consent",
            "--data-dir",
            DATA_DIR,
            "--receiver-token-file",
            "/etc/herald/receiver-auth/token",
            "--shutdown-timeout",
            "50s"
        ])
    );
    // The delivery store on the replica's claim, the only writable place in the container.
    assert_eq!(data_volume(&statefulset), default_claim());
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "data", "mountPath": DATA_DIR},
               {"name": "receiver-auth", "mountPath": "/etc/herald/receiver-auth",
                "readOnly": true}])
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{sc}");
    assert_eq!(sc["runAsUser"], 65532, "{sc}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{sc}");

    let env: BTreeMap<String, Value> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or("").to_owned(), e.clone()))
        .collect();
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );

    assert_eq!(
        c["ports"],
        json!([{"name": "receiver", "containerPort": 8080, "protocol": "TCP"},
               {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}])
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "receiver");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "receiver");
    assert_eq!(
        c["resources"],
        json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
    );

    // The Service and the PDB select exactly the StatefulSet's pods.
    let pod_labels = at(spec, "/template/metadata/labels").as_object().unwrap();
    let selects_pods = |selector: &Value| {
        let selector = selector.as_object().expect("selector is a map");
        assert!(!selector.is_empty());
        for (k, v) in selector {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "selector {k}={v} misses the pods"
            );
        }
    };
    selects_pods(at(spec, "/selector/matchLabels"));
    let service = kubectl_json(&["get", "-n", "herald", "service/herald"]);
    selects_pods(at(&service, "/spec/selector"));
    let ports = at(&service, "/spec/ports").as_array().unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0]["port"], 8080);
    assert_eq!(ports[0]["targetPort"], "receiver");
    assert_eq!(ports[1]["port"], 9090);
    assert_eq!(ports[1]["targetPort"], "metrics");
    let pdb = kubectl_json(&["get", "-n", "herald", "pdb/herald"]);
    assert_eq!(at(&pdb, "/spec/minAvailable"), 1);
    selects_pods(at(&pdb, "/spec/selector/matchLabels"));
}

#[test]
fn deploy_applies_with_plain_f_on_a_fresh_cluster() {
    // A plane of its own: `-f` applies files in name order, so only a cluster without the
    // Namespace shows whether it comes first.
    let plane = control_plane::ControlPlane::start().unwrap_or_else(|e| panic!("{e:#}"));
    let applied = kubectl_on(
        &plane.kubeconfig,
        &["apply", "--server-side", "-f", "deploy/"],
        None,
    );
    let mut args = vec!["get", "-n", "herald"];
    args.extend_from_slice(DEPLOY_OBJECTS);
    args.extend_from_slice(&["-o", "name"]);
    let listed: BTreeSet<String> = kubectl_on(&plane.kubeconfig, &args, None)
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: BTreeSet<String> = DEPLOY_OBJECTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, expected, "apply output:\n{applied}");
}

#[test]
fn kustomization_lists_every_manifest() {
    let mut from_files = BTreeSet::new();
    for file in deploy_files() {
        let yaml = std::fs::read_to_string(&file).expect("manifest");
        for object in objects(&yaml) {
            assert!(
                from_files.insert(identity(&object)),
                "{} is declared twice",
                identity(&object)
            );
        }
    }
    let built = ok("kubectl", &["kustomize", "deploy/"], None);
    let from_kustomize: BTreeSet<String> = objects(&built).iter().map(identity).collect();
    assert_eq!(
        from_kustomize, from_files,
        "`kubectl apply -k deploy/` and `kubectl apply -f deploy/` must install the same objects"
    );
    assert_eq!(from_files.len(), DEPLOY_OBJECTS.len(), "{from_files:#?}");
}

/// `kubectl auth can-i VERB RESOURCE ... --as SERVICE_ACCOUNT`.
fn can_i(args: &[&str]) -> bool {
    let plane = control_plane::shared();
    let mut all = vec![
        "--kubeconfig",
        plane.kubeconfig.to_str().unwrap(),
        "auth",
        "can-i",
        "--as",
        SERVICE_ACCOUNT,
    ];
    all.extend_from_slice(args);
    let out = run("kubectl", &all, None);
    let answer = text(&out.stdout).trim().to_owned();
    match (out.status.code(), answer.as_str()) {
        (Some(0), "yes") => true,
        (Some(1), "no") => false,
        _ => panic!(
            "kubectl auth can-i {args:?}: {} {answer:?} {}",
            out.status,
            text(&out.stderr)
        ),
    }
}

/// The service account's resource rules in `namespace` (`kubectl auth can-i --list`), without
/// the self-review rules every authenticated user has.
fn rules_in(namespace: &str) -> BTreeMap<String, BTreeSet<String>> {
    let out = kubectl(&[
        "auth",
        "can-i",
        "--list",
        "--as",
        SERVICE_ACCOUNT,
        "-n",
        namespace,
    ]);
    let mut rules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in out.lines().skip(1) {
        if line.starts_with(char::is_whitespace) {
            continue; // a non-resource URL
        }
        let resource = line.split_whitespace().next().unwrap_or_default();
        if resource.starts_with("selfsubject") {
            continue;
        }
        let verbs = line
            .rfind('[')
            .and_then(|open| Some(&line[open + 1..open + line[open..].find(']')?]))
            .unwrap_or_else(|| panic!("no verbs in {line:?}"));
        rules
            .entry(resource.to_owned())
            .or_default()
            .extend(verbs.split_whitespace().map(str::to_owned));
    }
    rules
}

fn rule_set(rules: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
    rules
        .iter()
        .map(|(resource, verbs)| {
            (
                resource.to_string(),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

#[test]
fn service_account_has_exactly_the_controller_permissions() {
    deployed();
    let yes: &[&[&str]] = &[
        &["list", "webhooks.herald.dev", "--all-namespaces"],
        &["watch", "webhooks.herald.dev", "--all-namespaces"],
        &["get", "webhooks.herald.dev", "-n", "team-a"],
        &[
            "list",
            "notificationconditions.herald.dev",
            "--all-namespaces",
        ],
        &[
            "watch",
            "notificationconditions.herald.dev",
            "--all-namespaces",
        ],
        &[
            "patch",
            "webhooks.herald.dev",
            "--subresource=status",
            "-n",
            "team-a",
        ],
        // NotificationConditions show Ready and the webhooks that use them.
        &[
            "patch",
            "notificationconditions.herald.dev",
            "--subresource=status",
            "-n",
            "team-a",
        ],
        &["list", "secrets", "--all-namespaces"],
        &["watch", "secrets", "--all-namespaces"],
        &["get", "secrets", "-n", "team-a"],
        &["create", "events.events.k8s.io", "-n", "team-a"],
        &["patch", "events.events.k8s.io", "-n", "team-a"],
        // The Kubernetes Events that Events webhooks deliver.
        &["list", "events.events.k8s.io", "--all-namespaces"],
        &["watch", "events.events.k8s.io", "--all-namespaces"],
        &["get", "leases.coordination.k8s.io", "-n", "herald"],
        &["create", "leases.coordination.k8s.io", "-n", "herald"],
        &["update", "leases.coordination.k8s.io", "-n", "herald"],
    ];
    let no: &[&[&str]] = &[
        // Leases only in Herald's own namespace.
        &["get", "leases.coordination.k8s.io", "-n", "default"],
        &["create", "leases.coordination.k8s.io", "-n", "default"],
        &["update", "leases.coordination.k8s.io", "-n", "team-a"],
        &["delete", "leases.coordination.k8s.io", "-n", "herald"],
        // Secrets are read, never written.
        &["create", "secrets", "-n", "team-a"],
        &["update", "secrets", "-n", "team-a"],
        &["patch", "secrets", "-n", "team-a"],
        &["delete", "secrets", "-n", "team-a"],
        // The Webhook spec and metadata belong to the user (`herald test` patches as them).
        &["patch", "webhooks.herald.dev", "-n", "team-a"],
        &["update", "webhooks.herald.dev", "-n", "team-a"],
        &["create", "webhooks.herald.dev", "-n", "team-a"],
        &[
            "update",
            "webhooks.herald.dev",
            "--subresource=status",
            "-n",
            "team-a",
        ],
        &["patch", "notificationconditions.herald.dev", "-n", "team-a"],
        &[
            "update",
            "notificationconditions.herald.dev",
            "--subresource=status",
            "-n",
            "team-a",
        ],
        // Events through events.k8s.io only, never the core group.
        &["create", "events", "-n", "team-a"],
        &["list", "events", "--all-namespaces"],
        &["update", "events.events.k8s.io", "-n", "team-a"],
        // Nothing is deleted.
        &["delete", "webhooks.herald.dev", "-n", "team-a"],
        &[
            "delete",
            "notificationconditions.herald.dev",
            "-n",
            "team-a",
        ],
        &["delete", "events.events.k8s.io", "-n", "team-a"],
        &["deletecollection", "secrets", "-n", "team-a"],
        &["delete", "statefulsets.apps", "-n", "herald"],
        &["delete", "*", "--all-namespaces"],
        &["*", "*", "--all-namespaces"],
    ];
    let mut wrong = Vec::new();
    for args in yes {
        if !can_i(args) {
            wrong.push(format!("cannot {args:?}"));
        }
    }
    for args in no {
        if can_i(args) {
            wrong.push(format!("can {args:?}"));
        }
    }
    assert!(wrong.is_empty(), "{SERVICE_ACCOUNT}: {wrong:#?}");

    // And nothing beyond: the complete rule lists, in Herald's namespace and in another one.
    let cluster_wide: &[(&str, &[&str])] = &[
        ("webhooks.herald.dev", &["get", "list", "watch"]),
        (
            "notificationconditions.herald.dev",
            &["get", "list", "watch"],
        ),
        ("webhooks.herald.dev/status", &["patch"]),
        ("notificationconditions.herald.dev/status", &["patch"]),
        ("secrets", &["get", "list", "watch"]),
        (
            "events.events.k8s.io",
            &["create", "patch", "list", "watch"],
        ),
    ];
    let mut in_herald = cluster_wide.to_vec();
    in_herald.push(("leases.coordination.k8s.io", &["get", "create", "update"]));
    assert_eq!(rules_in("herald"), rule_set(&in_herald));
    assert_eq!(rules_in("team-a"), rule_set(cluster_wide));
}

/// A running `herald controller`; killed when dropped.
struct Controller {
    process: Process,
    _dir: tempfile::TempDir,
}

impl Controller {
    fn log(&self) -> String {
        self.process.log()
    }
}

/// One HTTP/1.0 GET on loopback; the status code.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Polls `check` every 200 ms until it returns `Some`, panicking with `what` and the
/// controller's log after [`WAIT`].
fn wait_for<T>(what: &str, controller: &Controller, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; controller log:\n{}",
            controller.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ready_condition(webhook: &Value) -> Option<(String, String)> {
    webhook["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
}

#[test]
fn controller_runs_with_only_the_service_account_permissions() {
    deployed();
    let plane = control_plane::shared();

    // An admin kubeconfig that impersonates the ServiceAccount (kube-rs honours `as`).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut kubeconfig: Value =
        serde_json::from_str(&std::fs::read_to_string(&plane.kubeconfig).expect("kubeconfig"))
            .expect("the plane's kubeconfig is JSON");
    kubeconfig["users"][0]["user"]["as"] = json!(SERVICE_ACCOUNT);
    let sa_kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&sa_kubeconfig, kubeconfig.to_string()).expect("writing kubeconfig");

    // The StatefulSet's own command line, plus what differs outside a pod: the delivery store
    // in a temporary directory instead of the pod's volume, the listeners on free ports.
    let statefulset = objects(&read("deploy/statefulset.yaml"));
    let container = at(&statefulset[0], "/spec/template/spec/containers/0");
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect();
    let data_dir = dir.path().join("data");
    let value = args
        .iter()
        .position(|a| a == "--data-dir")
        .expect("deploy/ passes --data-dir")
        + 1;
    assert_eq!(args[value], DATA_DIR);
    args[value] = data_dir.to_str().expect("UTF-8 path").to_owned();
    // The receiver's token from a file of ours instead of the pod's Secret volume.
    let token_file = dir.path().join("receiver-token");
    std::fs::write(&token_file, "install-test-token").expect("token file");
    let value = args
        .iter()
        .position(|a| a == "--receiver-token-file")
        .expect("deploy/ passes --receiver-token-file")
        + 1;
    args[value] = token_file.to_str().expect("UTF-8 path").to_owned();
    let [port, admin_port, metrics_port] = free_ports();
    let value = args
        .iter()
        .position(|a| a == "--metrics-listen")
        .expect("deploy/ passes --metrics-listen")
        + 1;
    args[value] = format!("127.0.0.1:{metrics_port}");
    args.extend([
        // The test endpoints listen on loopback, which a controller refuses by default.
        "--allow-loopback".into(),
        "--kubeconfig".into(),
        sa_kubeconfig.to_str().unwrap().into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--admin-listen".into(),
        format!("127.0.0.1:{admin_port}"),
        "--status-interval".into(),
        "200ms".into(),
    ]);
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .args(&args)
        .env("POD_NAMESPACE", "herald")
        .env("POD_NAME", "herald-install-test")
        .env("RUST_LOG", "info");
    let process = Process::spawn("herald controller", command, &dir.path().join("herald.log"))
        .expect("spawning herald controller");
    let controller = Controller { process, _dir: dir };

    // Ready means the initial lists of Webhooks, NotificationConditions and Secrets worked.
    wait_for("/readyz", &controller, || {
        (http_status(port, "/readyz") == Some(200)).then_some(())
    });
    // --data-dir: the durable store is open there.
    assert!(
        data_dir.join("herald.redb").is_file(),
        "no delivery store in {}; controller log:\n{}",
        data_dir.display(),
        controller.log()
    );
    // Leader election created the Lease in Herald's namespace.
    wait_for("the leader Lease", &controller, || {
        let lease = kubectl_json(&["get", "-n", "herald", "leases.coordination.k8s.io"]);
        lease["items"]
            .as_array()?
            .iter()
            .any(|l| l["spec"]["holderIdentity"] == "herald-install-test")
            .then_some(())
    });

    let ns = "install-e2e";
    kubectl_on(
        &plane.kubeconfig,
        &["apply", "--server-side", "-f", "-"],
        Some(&format!(
            r#"{{"apiVersion": "v1", "kind": "Namespace", "metadata": {{"name": "{ns}"}}}}
---
{{"apiVersion": "herald.dev/v1alpha1", "kind": "Webhook",
  "metadata": {{"name": "ops", "namespace": "{ns}"}},
  "spec": {{"url": "http://127.0.0.1:9/closed",
           "auth": {{"type": "Bearer", "secretRef": {{"name": "ops-auth"}}}}}}}}
---
{{"apiVersion": "herald.dev/v1alpha1", "kind": "Webhook",
  "metadata": {{"name": "metadata", "namespace": "{ns}"}},
  "spec": {{"url": "http://169.254.169.254/latest/meta-data/"}}}}
"#
        )),
    );
    // The destination policy: the cloud metadata address is refused.
    wait_for("Ready=False ForbiddenAddress", &controller, || {
        let webhook = kubectl_json(&["get", "-n", ns, "webhooks.herald.dev/metadata"]);
        (ready_condition(&webhook)? == ("False".into(), "ForbiddenAddress".into())).then_some(())
    });
    // Status is written (patch webhooks/status): the Secret is missing.
    wait_for("Ready=False SecretNotFound", &controller, || {
        let webhook = kubectl_json(&["get", "-n", ns, "webhooks.herald.dev/ops"]);
        (ready_condition(&webhook)? == ("False".into(), "SecretNotFound".into())).then_some(())
    });
    // The Secret watch sees it arrive and the controller reads it (get secrets).
    kubectl(&[
        "create",
        "secret",
        "generic",
        "ops-auth",
        "-n",
        ns,
        "--from-literal=token=s3cret",
    ]);
    // --require-secret-consent: unused until its owner marks it.
    wait_for("Ready=False SecretRefused", &controller, || {
        let webhook = kubectl_json(&["get", "-n", ns, "webhooks.herald.dev/ops"]);
        (ready_condition(&webhook)? == ("False".into(), "SecretRefused".into())).then_some(())
    });
    kubectl(&["label", "-n", ns, "secret/ops-auth", "herald.dev/use=true"]);
    wait_for("Ready=True", &controller, || {
        let webhook = kubectl_json(&["get", "-n", ns, "webhooks.herald.dev/ops"]);
        (ready_condition(&webhook)?.0 == "True").then_some(())
    });
    // A test send records lastTest and publishes an Event (create events.k8s.io events).
    kubectl(&[
        "annotate",
        "-n",
        ns,
        "webhooks.herald.dev/ops",
        "herald.dev/send-test=install-1",
    ]);
    wait_for("status.lastTest", &controller, || {
        let webhook = kubectl_json(&["get", "-n", ns, "webhooks.herald.dev/ops"]);
        (webhook["status"]["lastTest"]["token"] == "install-1").then_some(())
    });
    wait_for("an Event on the webhook", &controller, || {
        let events = kubectl_json(&["get", "-n", ns, "events.events.k8s.io"]);
        events["items"]
            .as_array()?
            .iter()
            .any(|e| e["regarding"]["name"] == "ops" && e["regarding"]["kind"] == "Webhook")
            .then_some(())
    });

    // A 403 from the API server; the refused metadata Webhook says ForbiddenAddress instead.
    let log = controller.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|line| {
            line.to_lowercase().contains("forbidden")
                && !line.contains("ForbiddenAddress")
                && !line.contains("--deny-link-local")
        })
        .collect();
    assert!(
        refused.is_empty(),
        "the controller was refused something:\n{log}"
    );
}

#[test]
fn chart_lints_clean() {
    for extra in [&[][..], &["--values", "-"][..]] {
        let mut args = vec!["lint", "--strict", "charts/herald"];
        args.extend_from_slice(extra);
        let values = (!extra.is_empty()).then_some(EVERY_OPTION);
        let out = run("helm", &args, values);
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "helm {args:?}:\n{report}");
        assert!(
            report.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{report}"
        );
        assert!(
            !report.contains("[WARNING]") && !report.contains("[ERROR]"),
            "helm {args:?}:\n{report}"
        );
    }
}

/// Values turning on every option of the chart.
const EVERY_OPTION: &str = r#"
image:
  repository: registry.example.com/herald
  tag: "0.1.0-test"
  pullPolicy: Always
replicaCount: 3
clusterNamespaces: [monitoring, platform]
watchNamespaces: [monitoring, team-a]
receiverAuth:
  existingSecret: herald-receiver
  key: bearer
leaderElection:
  enabled: true
events:
  enabled: true
destinations:
  allow: [10.0.0.0/8, "team-a=*.example.com"]
  deny: [10.96.0.0/12]
persistence:
  enabled: true
  emptyDir: {enabled: true, sizeLimit: 1Gi}
terminationGracePeriodSeconds: 120
resources:
  requests: {cpu: 100m, memory: 128Mi}
  limits: {memory: 512Mi}
extraArgs: [--backlog-limit=5000, --status-interval=5s]
podAnnotations:
  example.com/team: platform
nodeSelector:
  kubernetes.io/os: linux
tolerations:
  - {key: dedicated, operator: Equal, value: monitoring, effect: NoSchedule}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels: {app.kubernetes.io/name: herald}
pdb:
  enabled: true
serviceMonitor:
  enabled: true
  interval: 15s
  labels: {release: prometheus}
prometheusRule:
  enabled: true
  labels: {release: prometheus}
"#;

/// `helm template RELEASE charts/herald -n NAMESPACE [--values -] extra...`.
fn template(release: &str, namespace: &str, values: Option<&str>, extra: &[&str]) -> Output {
    let mut args = vec!["template", release, "charts/herald", "-n", namespace];
    if values.is_some() {
        args.extend_from_slice(&["--values", "-"]);
    }
    args.extend_from_slice(extra);
    run("helm", &args, values)
}

/// What `helm template` renders: each document's text and value.
fn rendered_documents(
    release: &str,
    namespace: &str,
    values: Option<&str>,
) -> Vec<(String, Value)> {
    let out = template(release, namespace, values, &[]);
    assert!(
        out.status.success(),
        "helm template {release}: {}",
        text(&out.stderr)
    );
    documents(&text(&out.stdout))
}

fn rendered(release: &str, namespace: &str, values: Option<&str>) -> Vec<Value> {
    rendered_documents(release, namespace, values)
        .into_iter()
        .map(|(_, value)| value)
        .collect()
}

/// Creates `namespace` and applies `docs` (their text, exactly as `helm template` wrote it)
/// into it for real, server-side; returns the objects the server has afterwards, by identity.
fn apply_into(namespace: &str, docs: &[(String, Value)]) -> BTreeMap<String, Value> {
    let mut stream = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            .to_string(),
    ];
    stream.extend(docs.iter().map(|(text, _)| text.clone()));
    kubectl_on(
        &control_plane::shared().kubeconfig,
        &["apply", "--server-side", "-f", "-"],
        Some(&stream.join("\n---\n")),
    );
    let mut live = BTreeMap::new();
    for (_, object) in docs {
        let kind = object["kind"].as_str().unwrap().to_lowercase();
        let name = object["metadata"]["name"].as_str().unwrap();
        let got = kubectl_json(&["get", "-n", namespace, &format!("{kind}/{name}")]);
        live.insert(identity(object), got);
    }
    live
}

const CHART_KINDS: &[&str] = &[
    "ClusterRole",
    "ClusterRoleBinding",
    "PodDisruptionBudget",
    "Role",
    "RoleBinding",
    "Secret",
    "Service",
    "ServiceAccount",
    "StatefulSet",
];

#[test]
fn chart_default_render_applies_and_matches_deploy() {
    let docs = rendered_documents("hd", "herald-chart-default", None);
    let kinds: BTreeSet<&str> = docs
        .iter()
        .filter_map(|(_, o)| o["kind"].as_str())
        .collect();
    assert_eq!(kinds, CHART_KINDS.iter().copied().collect());
    assert_eq!(docs.len(), CHART_KINDS.len());
    let live = apply_into("herald-chart-default", &docs);
    let statefulset = &live["StatefulSet/herald-chart-default/hd-herald"];
    assert_eq!(at(statefulset, "/spec/replicas"), 2);
    let args = at(statefulset, "/spec/template/spec/containers/0/args");
    assert_eq!(
        args,
        &json!([
            "controller",
            "--log-format=json",
            "--leader-election=true",
            "--events=true",
            "--shutdown-timeout=50s",
            "--lease-name=hd-herald-leader",
            "--metrics-listen=0.0.0.0:9090",
            "--require-secret-consent",
            "--data-dir=/var/lib/herald",
            "--receiver-token-file=/etc/herald/receiver-auth/token"
        ])
    );
    assert_eq!(data_volume(statefulset), default_claim());
    assert_eq!(
        at(statefulset, "/spec/updateStrategy/type"),
        "RollingUpdate"
    );

    // The CRDs ship in crds/ (installed by `helm install`, rendered with --include-crds).
    let out = template("hd", "herald-chart-default", None, &["--include-crds"]);
    let crds: BTreeSet<String> = objects(&text(&out.stdout))
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .map(identity)
        .collect();
    assert_eq!(
        crds,
        BTreeSet::from([
            "CustomResourceDefinition/-/notificationconditions.herald.dev".to_owned(),
            "CustomResourceDefinition/-/webhooks.herald.dev".to_owned(),
        ])
    );

    // Released as `herald` in namespace `herald`, the chart renders what deploy/ holds.
    let chart = rendered("herald", "herald", None);
    let mut deploy = Vec::new();
    for file in deploy_files() {
        deploy.extend(objects(&std::fs::read_to_string(file).unwrap()));
    }
    // deploy/ leaves the receiver's token Secret to the installer (README, Install).
    for kind in CHART_KINDS.iter().filter(|kind| **kind != "Secret") {
        let (c, d) = (of_kind(&chart, kind), of_kind(&deploy, kind));
        assert_eq!(identity(c), identity(d));
        for pointer in [
            "/rules",
            "/roleRef",
            "/subjects",
            "/spec/ports",
            "/spec/minAvailable",
        ] {
            assert_eq!(c.pointer(pointer), d.pointer(pointer), "{kind} {pointer}");
        }
    }
    let (c, d) = (
        of_kind(&chart, "StatefulSet"),
        of_kind(&deploy, "StatefulSet"),
    );
    for pointer in [
        "/spec/replicas",
        "/spec/template/spec/serviceAccountName",
        "/spec/template/spec/terminationGracePeriodSeconds",
        "/spec/template/spec/securityContext",
        "/spec/template/spec/containers/0/image",
        "/spec/template/spec/containers/0/env",
        "/spec/template/spec/containers/0/ports",
        "/spec/template/spec/containers/0/livenessProbe",
        "/spec/template/spec/containers/0/readinessProbe",
        "/spec/template/spec/containers/0/resources",
        "/spec/template/spec/containers/0/securityContext",
        "/spec/template/spec/containers/0/volumeMounts",
        "/spec/template/spec/volumes",
        "/spec/serviceName",
        "/spec/podManagementPolicy",
        "/spec/updateStrategy",
        "/spec/persistentVolumeClaimRetentionPolicy",
        "/spec/volumeClaimTemplates/0/spec",
    ] {
        assert_eq!(
            c.pointer(pointer),
            d.pointer(pointer),
            "StatefulSet {pointer}"
        );
    }
    // The same command line, but for the chart spelling out three of the binary's defaults.
    let args = "/spec/template/spec/containers/0/args";
    let mut expected = flags(at(d, args));
    expected.extend(
        [
            ("--leader-election", "true"),
            ("--events", "true"),
            ("--lease-name", "herald-leader"),
        ]
        .map(|(flag, value)| (flag.to_owned(), value.to_owned())),
    );
    let mut chart_flags = flags(at(c, args));
    expected.sort();
    chart_flags.sort();
    assert_eq!(chart_flags, expected);
}

#[test]
fn chart_with_every_option_renders_and_applies() {
    let ns = "herald-chart-full";
    let raw = rendered_documents("hf", ns, Some(EVERY_OPTION));
    let docs: Vec<Value> = raw.iter().map(|(_, value)| value.clone()).collect();

    // The two Prometheus Operator kinds: checked here, not applied (their CRDs are not
    // installed on the test plane).
    let monitor = of_kind(&docs, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let service = of_kind(&docs, "Service");
    assert_eq!(
        at(monitor, "/spec/selector/matchLabels"),
        at(service, "/spec/selector")
    );
    let endpoint = at(monitor, "/spec/endpoints/0");
    assert_eq!(endpoint["port"], at(service, "/spec/ports/1/name").clone());
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
    assert_eq!(endpoint["honorLabels"], true);

    let rule = of_kind(&docs, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let alerts: BTreeMap<String, String> = at(rule, "/spec/groups/0/rules")
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    let failing = &alerts["HeraldDeliveriesFailing"];
    assert!(
        failing.contains(r#"rate(herald_deliveries_total{outcome="failed"}[5m])"#)
            && failing.ends_with("> 0"),
        "{failing}"
    );
    let not_ready = &alerts["HeraldWebhookNotReady"];
    assert!(
        not_ready.contains(r#"herald_webhooks{ready="false"}"#) && not_ready.ends_with("> 0"),
        "{not_ready}"
    );

    let core: Vec<(String, Value)> = raw
        .iter()
        .filter(|(_, o)| o["apiVersion"] != "monitoring.coreos.com/v1")
        .cloned()
        .collect();
    // The receiver's token Secret is the installer's (receiverAuth.existingSecret).
    assert_eq!(core.len(), CHART_KINDS.len() - 1);
    let live = apply_into(ns, &core);
    let statefulset = &live[&format!("StatefulSet/{ns}/hf-herald")];
    let pod = at(statefulset, "/spec/template");
    let container = at(pod, "/spec/containers/0");
    assert_eq!(at(statefulset, "/spec/replicas"), 3);
    assert_eq!(container["image"], "registry.example.com/herald:0.1.0-test");
    assert_eq!(container["imagePullPolicy"], "Always");
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "controller",
            "--log-format=json",
            "--leader-election=true",
            "--events=true",
            "--shutdown-timeout=110s",
            "--lease-name=hf-herald-leader",
            "--metrics-listen=0.0.0.0:9090",
            "--require-secret-consent",
            "--allow-destination=10.0.0.0/8",
            "--allow-destination=team-a=*.example.com",
            "--deny-destination=10.96.0.0/12",
            "--data-dir=/var/lib/herald",
            "--cluster-namespace=monitoring",
            "--cluster-namespace=platform",
            "--watch-namespace=monitoring",
            "--watch-namespace=team-a",
            "--receiver-token-file=/etc/herald/receiver-auth/token",
            "--backlog-limit=5000",
            "--status-interval=5s",
        ]
    );
    // The binary accepts that command line (clap parses every flag before --help).
    let mut check: Vec<&str> = args.clone();
    check.push("--help");
    let parsed = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(&check)
        .output()
        .expect("running herald");
    assert!(
        parsed.status.success(),
        "herald rejects the chart's arguments: {}",
        text(&parsed.stderr)
    );

    // The delivery store on a size-limited emptyDir where --data-dir points; the token Secret
    // mounted where --receiver-token-file points, both usable by the non-root user through
    // fsGroup.
    assert_eq!(
        data_volume(statefulset),
        json!({"name": "data", "emptyDir": {"sizeLimit": "1Gi"}})
    );
    assert!(
        statefulset["spec"].get("volumeClaimTemplates").is_none(),
        "the emptyDir opt-out: no claims; {statefulset:#}"
    );
    assert_eq!(at(pod, "/spec/terminationGracePeriodSeconds"), 120);
    assert_eq!(
        container["volumeMounts"],
        json!([{"name": "data", "mountPath": DATA_DIR},
               {"name": "receiver-auth", "mountPath": "/etc/herald/receiver-auth",
                "readOnly": true}])
    );
    assert_eq!(
        at(pod, "/spec/volumes"),
        &json!([{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
                {"name": "receiver-auth", "secret": {
            "secretName": "herald-receiver", "defaultMode": 0o440,
            "items": [{"key": "bearer", "path": "token"}]}}])
    );
    assert_eq!(at(pod, "/spec/securityContext/fsGroup"), 65532);
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    );
    assert_eq!(
        at(pod, "/metadata/annotations/example.com~1team"),
        "platform"
    );
    assert_eq!(
        at(pod, "/spec/nodeSelector"),
        &json!({"kubernetes.io/os": "linux"})
    );
    assert_eq!(at(pod, "/spec/tolerations/0/key"), "dedicated");
    assert_eq!(
        at(
            pod,
            "/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution/0/weight"
        ),
        100
    );
    let pdb = &live[&format!("PodDisruptionBudget/{ns}/hf-herald")];
    assert_eq!(at(pdb, "/spec/minAvailable"), 1);
}

#[test]
fn chart_options_turned_off_drop_their_permissions() {
    let docs = rendered(
        "hs",
        "herald-single",
        Some(concat!(
            "replicaCount: 1\nleaderElection: {enabled: false}\nevents: {enabled: false}\n",
            "persistence: {enabled: false}\nreceiverAuth: {enabled: false}\n",
            "secretConsent: {required: false}\n"
        )),
    );
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert!(
        !kinds.contains("Role") && !kinds.contains("RoleBinding"),
        "no leader election: no Lease permissions; {kinds:?}"
    );
    assert!(
        !kinds.contains("PodDisruptionBudget"),
        "one replica: no PDB; {kinds:?}"
    );
    let statefulset = of_kind(&docs, "StatefulSet");
    assert!(
        statefulset["spec"].get("volumeClaimTemplates").is_none(),
        "{statefulset:#}"
    );
    let pod = at(statefulset, "/spec/template/spec");
    assert_eq!(
        at(pod, "/containers/0/args"),
        &json!([
            "controller",
            "--log-format=json",
            "--leader-election=false",
            "--events=false",
            "--shutdown-timeout=50s",
            "--metrics-listen=0.0.0.0:9090"
        ]),
        "no --require-secret-consent, no --data-dir (deliveries held in memory), no token"
    );
    assert!(
        pod.get("volumes").is_none() && pod["containers"][0].get("volumeMounts").is_none(),
        "no persistence, no receiver token: no volumes; {pod:#}"
    );
    let events_rule = at(of_kind(&docs, "ClusterRole"), "/rules")
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["apiGroups"] == json!(["events.k8s.io"]))
        .expect("an events.k8s.io rule");
    assert_eq!(
        events_rule["verbs"],
        json!(["create", "patch"]),
        "without --events nothing lists Events"
    );
}

#[test]
fn chart_claims_replace_the_claim_template() {
    let ns = "herald-chart-claim";
    let docs = rendered_documents(
        "hc",
        ns,
        Some("replicaCount: 1\npersistence: {existingClaim: herald-data}\n"),
    );
    let live = apply_into(ns, &docs);
    let statefulset = &live[&format!("StatefulSet/{ns}/hc-herald")];
    assert_eq!(
        data_volume(statefulset),
        json!({"name": "data", "persistentVolumeClaim": {"claimName": "herald-data"}})
    );
    // A StatefulSet replaces a pod only once the old one is gone: the store is never opened
    // twice.
    assert_eq!(
        at(statefulset, "/spec/updateStrategy/type"),
        "RollingUpdate"
    );

    // A storage class and a size for the claim template.
    // (Claim templates cannot change on a live StatefulSet: another release.)
    let class_ns = "herald-chart-class";
    let docs = rendered_documents(
        "hk",
        class_ns,
        Some("persistence: {size: 5Gi, storageClassName: fast}\n"),
    );
    let live = apply_into(class_ns, &docs);
    let statefulset = &live[&format!("StatefulSet/{class_ns}/hk-herald")];
    assert_eq!(
        data_volume(statefulset),
        json!({"name": "data", "claim": {"accessModes": ["ReadWriteOnce"], "storage": "5Gi",
                                          "storageClassName": "fast"}})
    );

    // persistence.enabled=false wins over a claim.
    let docs = rendered(
        "hc",
        ns,
        Some("replicaCount: 1\npersistence: {enabled: false, existingClaim: herald-data}\n"),
    );
    let statefulset = of_kind(&docs, "StatefulSet");
    assert!(
        statefulset["spec"].get("volumeClaimTemplates").is_none(),
        "{statefulset:#}"
    );
    let pod = at(statefulset, "/spec/template/spec");
    assert!(
        !pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["name"] == "data"),
        "{pod:#}"
    );
    assert!(
        !flags(at(pod, "/containers/0/args"))
            .iter()
            .any(|(flag, _)| flag == "--data-dir"),
        "{pod:#}"
    );
}

/// `store.type: postgres`: a Deployment that may scale (with an optional autoscaler on CPU),
/// the connection string read from a Secret's file, no store on a volume; accepted by the real
/// API server. Without the Secret the chart refuses to render.
#[test]
fn chart_postgres_store_is_a_scalable_deployment() {
    let ns = "herald-chart-postgres";
    let values = "store: {type: postgres, existingSecret: herald-db, caSecret: herald-db-ca, poolSize: 4, lease: 20s}\n\
                  autoscaling: {enabled: true, minReplicas: 2, maxReplicas: 5}\n";
    let docs = rendered_documents("hp", ns, Some(values));
    let values_only: Vec<Value> = docs.iter().map(|(_, v)| v.clone()).collect();
    assert!(
        !values_only.iter().any(|d| d["kind"] == "StatefulSet"),
        "no StatefulSet with the PostgreSQL store"
    );
    let live = apply_into(ns, &docs);
    let deployment = &live[&format!("Deployment/{ns}/hp-herald")];
    let pod = at(deployment, "/spec/template/spec");
    let args = flags(at(pod, "/containers/0/args"));
    for (flag, value) in [
        ("--database-url-file", "/etc/herald/database/url"),
        ("--database-ca-file", "/etc/herald/database-ca/ca.crt"),
        ("--database-pool-size", "4"),
        ("--database-lease", "20s"),
    ] {
        assert!(
            args.iter().any(|(f, v)| f == flag && v == value),
            "{flag}={value} in {args:?}"
        );
    }
    assert!(
        !args.iter().any(|(flag, _)| flag == "--data-dir"),
        "{args:?}"
    );
    let volumes = pod["volumes"].as_array().expect("volumes");
    let database = volumes
        .iter()
        .find(|v| v["name"] == "database")
        .expect("the database Secret volume");
    assert_eq!(database["secret"]["secretName"], "herald-db");
    assert_eq!(database["secret"]["items"][0]["key"], "url");
    assert!(
        !volumes.iter().any(|v| v["name"] == "data"),
        "no store volume: {volumes:?}"
    );
    assert!(
        of_kind(&values_only, "Deployment")["spec"]
            .get("replicas")
            .is_none(),
        "the autoscaler owns the replica count"
    );
    let autoscaler = &live[&format!("HorizontalPodAutoscaler/{ns}/hp-herald")];
    assert_eq!(at(autoscaler, "/spec/scaleTargetRef/kind"), "Deployment");
    assert_eq!(at(autoscaler, "/spec/scaleTargetRef/name"), "hp-herald");
    assert_eq!(at(autoscaler, "/spec/minReplicas"), 2);
    assert_eq!(at(autoscaler, "/spec/maxReplicas"), 5);
    assert_eq!(at(autoscaler, "/spec/metrics/0/resource/name"), "cpu");

    let refused = template("hp", ns, Some("store: {type: postgres}\n"), &[]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("store.existingSecret"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn chart_rejects_bad_values() {
    let cases: &[(&str, &str)] = &[
        (
            "replicaCount: two\n",
            "at '/replicaCount': got string, want integer",
        ),
        ("replicaCount: -1\n", "/replicaCount"),
        (
            "replicas: 2\n",
            "additional properties 'replicas' not allowed",
        ),
        ("image: {pullPolicy: Sometimes}\n", "/image/pullPolicy"),
        ("image: {tag: 1.1}\n", "/image/tag"),
        (
            "clusterNamespaces: [Not_A_Namespace]\n",
            "/clusterNamespaces/0",
        ),
        ("extraArgs: --foo\n", "/extraArgs"),
        (
            "serviceMonitor: {enabled: yes-please}\n",
            "/serviceMonitor/enabled",
        ),
        (
            "prometheusRule: {enable: true}\n",
            "additional properties 'enable' not allowed",
        ),
        ("logFormat: xml\n", "/logFormat"),
        (
            "secretConsent: {required: \"yes\"}\n",
            "/secretConsent/required",
        ),
        ("persistence: {enabled: 1}\n", "/persistence/enabled"),
        (
            "persistence: {enable: true}\n",
            "additional properties 'enable' not allowed",
        ),
        ("persistence: {emptyDir: []}\n", "/persistence/emptyDir"),
        (
            "persistence: {emptyDir: {sizeLimit: lots}}\n",
            "/persistence/emptyDir/sizeLimit",
        ),
        (
            "persistence: {emptyDir: {sizelimit: 1Gi}}\n",
            "additional properties 'sizelimit' not allowed",
        ),
        (
            "persistence: {existingClaim: Herald_Data}\n",
            "/persistence/existingClaim",
        ),
        (
            "persistence: {existingClaim: 7}\n",
            "/persistence/existingClaim",
        ),
        ("persistence: {size: lots}\n", "/persistence/size"),
        (
            "persistence: {emptyDir: {enabled: maybe}}\n",
            "/persistence/emptyDir/enabled",
        ),
        (
            "terminationGracePeriodSeconds: 5\n",
            "/terminationGracePeriodSeconds",
        ),
    ];
    for (values, expected) in cases {
        let out = template("bad", "herald", Some(values), &[]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "accepted {values:?}");
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(expected),
            "{values:?}: expected a schema error mentioning {expected:?}, got:\n{stderr}"
        );
    }
    // Refused by the templates rather than the schema.
    let out = template(
        "bad",
        "herald",
        Some("leaderElection: {enabled: false}\n"),
        &[],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("leaderElection.enabled=false needs replicaCount: 1"),
        "{}",
        text(&out.stderr)
    );
    // One claim cannot hold the stores of several replicas.
    let out = template(
        "bad",
        "herald",
        Some("persistence: {existingClaim: herald-data}\n"),
        &[],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("persistence.existingClaim needs replicaCount: 1"),
        "{}",
        text(&out.stderr)
    );
    // helm lint checks values against the schema too.
    let out = run(
        "helm",
        &["lint", "charts/herald", "--set", "replicaCount=two"],
        None,
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
}

#[test]
fn shipped_crds_equal_the_generated_crds() {
    let generated = std::fs::read(repo().join("crds/herald.yaml")).expect("crds/herald.yaml");
    for copy in ["deploy/crds.yaml", "charts/herald/crds/herald.yaml"] {
        let shipped = std::fs::read(repo().join(copy)).unwrap_or_else(|e| panic!("{copy}: {e}"));
        assert!(
            shipped == generated,
            "{copy} differs from crds/herald.yaml: run `cp crds/herald.yaml {copy}`"
        );
    }
}
