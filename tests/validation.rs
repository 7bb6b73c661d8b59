//! Offline validation: every fixture under `tests/fixtures/invalid` is refused with the message
//! its `# expect:` line names (the CRD's CEL rules and schema, as the API server would), and
//! every fixture under `tests/fixtures/valid` is accepted.

use std::path::Path;

use herald::standalone::Manifests;

fn fixtures(kind: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
}

#[test]
fn valid_fixtures_load_without_errors() {
    let manifests = Manifests::load(&fixtures("valid")).expect("read fixtures");
    assert!(manifests.errors.is_empty(), "{:#?}", manifests.errors);
    assert_eq!(manifests.webhooks.len(), 2);
    assert_eq!(manifests.conditions.len(), 1);
    let full = &manifests.webhooks[0];
    assert_eq!(full.spec.timeout_seconds, 30);
    let events = &manifests.webhooks[1];
    assert!(
        events.spec.enabled && events.spec.send_resolved,
        "defaults apply"
    );
    assert_eq!(events.spec.timeout_seconds, 10);
}

#[test]
fn every_invalid_fixture_is_refused_with_its_expected_message() {
    let dir = fixtures("invalid");
    let manifests = Manifests::load(&dir).expect("read fixtures");
    assert!(manifests.webhooks.is_empty(), "{:?}", manifests.webhooks);
    assert!(
        manifests.conditions.is_empty(),
        "{:?}",
        manifests.conditions
    );
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "fixtures went missing");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("fixture");
        let expected = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let errors: Vec<String> = manifests
            .errors
            .iter()
            .filter(|e| e.file == file)
            .map(|e| {
                let line = e.to_string();
                line[line.find(": ").map_or(0, |i| i + 2)..].to_string()
            })
            .collect();
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "{}: expected an error starting with {expected:?}, got {errors:?}",
            file.display()
        );
    }
}

#[test]
fn committed_crds_match_the_types() {
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/herald.yaml"))
            .expect("crds/herald.yaml");
    let generated = herald::crd::render_yaml().expect("render");
    assert!(
        committed == generated,
        "crds/herald.yaml is stale: run `cargo run -- crdgen > crds/herald.yaml`"
    );
}

#[tokio::test]
async fn the_examples_are_valid_and_every_webhook_but_the_disabled_one_is_ready() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/herald");
    let manifests = Manifests::load(&dir).expect("read examples");
    assert!(manifests.errors.is_empty(), "{:#?}", manifests.errors);
    // As the README says: every enabled example webhook points at 127.0.0.1:9099.
    for webhook in manifests.webhooks.iter().filter(|w| w.spec.enabled) {
        assert!(
            webhook.spec.url.starts_with("http://127.0.0.1:9099/"),
            "{:?}: {}",
            webhook.metadata.name,
            webhook.spec.url
        );
    }
    let dispatcher = herald::dispatch::Dispatcher::new(["default".to_string()], Default::default())
        .with_policy(herald::delivery::TargetPolicy::allowing_loopback());
    let mut loader = herald::standalone::Loader::new(&dir);
    let report = loader.reload(&dispatcher).expect("load");
    let not_ready: Vec<String> = report
        .not_ready
        .iter()
        .map(|(k, r)| format!("{k}: {r}"))
        .collect();
    assert_eq!(
        not_ready,
        ["default/self-signed: Disabled: spec.enabled is false"]
    );
}

#[test]
fn the_example_alertmanager_configuration_is_valid() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/alertmanager/alertmanager.yml");
    let out = std::process::Command::new("amtool")
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("amtool (apt-get install prometheus-alertmanager)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_file_with_thousands_of_documents_loads_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml: String = (0..1100)
        .map(|i| {
            format!("---\napiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: hook-{i}}}\nspec: {{url: 'http://127.0.0.1:9/x'}}\n")
        })
        .collect();
    std::fs::write(dir.path().join("many.yaml"), yaml).expect("write");
    let manifests = Manifests::load(dir.path()).expect("read");
    assert!(
        manifests.errors.is_empty(),
        "{:?}",
        manifests.errors.first()
    );
    assert_eq!(manifests.webhooks.len(), 1100);
}
