//! Standalone mode: Webhook, NotificationCondition and Secret manifests read from a folder (the
//! same YAML one would `kubectl apply`), validated with the API server's rules, fed to the core,
//! and reloaded when they change.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::controller::relist::Relist;
use crate::crd::{NotificationCondition, Webhook};
use crate::delivery::referenced_secrets;
use crate::dispatch::Dispatcher;
use crate::object::{NotReady, ObjectKey};
use crate::routing::ConditionInput;
use crate::secret::SecretData;

/// The namespace of a manifest that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A problem with one document of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    /// The file.
    pub file: PathBuf,
    /// 1-based document number within the file (0 when the whole file failed).
    pub document: usize,
    /// The field path, when known (e.g. `spec.url`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, " (document {})", self.document)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every valid manifest found in a folder, plus the errors of the invalid ones.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Webhooks, each with its namespace set (boxed, so that applying them one by one frees
    /// each as it goes).
    pub webhooks: Vec<Box<Webhook>>,
    /// Conditions, each with its namespace set.
    pub conditions: Vec<Box<NotificationCondition>>,
    /// Secrets by namespace and name.
    pub secrets: HashMap<ObjectKey, SecretData>,
    /// What could not be used, with file and field.
    pub errors: Vec<ManifestError>,
}

/// The manifest files below `dir` (`.yaml`, `.yml`, `.json`, hidden entries skipped), in name order.
pub fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        // Hidden entries include ConfigMap volume internals (`..data`), which the visible links point into.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            manifest_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// Most documents one manifest file may hold: a generated file may carry thousands of Webhooks.
pub const MAX_DOCUMENTS_PER_FILE: usize = 100_000;

fn parse_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: MAX_DOCUMENTS_PER_FILE,
        },
        // An error names its line and column, never shows the lines around it: they may be
        // a Secret's values.
        with_snippet: false,
    }
}

fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        (
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

fn cel_errors(errors: kube::core::cel::ValidationErrors) -> Vec<(String, String)> {
    errors
        .as_slice()
        .iter()
        .map(|e| (e.field_path.clone(), e.message.clone()))
        .collect()
}

impl Manifests {
    /// Reads every `.yaml`, `.yml` and `.json` file below `dir` (multi-document files too).
    pub fn load(dir: &Path) -> std::io::Result<Manifests> {
        let mut files = Vec::new();
        manifest_files(dir, &mut files)?;
        let mut manifests = Manifests::default();
        let mut seen: BTreeSet<(String, ObjectKey)> = BTreeSet::new();
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    manifests.error(&file, 0, "", format!("cannot read: {e}"));
                    continue;
                }
            };
            let docs: Vec<serde_json::Value> =
                match serde_saphyr::from_multiple_with_options(&text, parse_options()) {
                    Ok(docs) => docs,
                    Err(e) => {
                        manifests.error(&file, 0, "", format!("invalid YAML: {e}"));
                        continue;
                    }
                };
            for (i, doc) in docs.into_iter().enumerate() {
                if doc.is_null() {
                    continue;
                }
                manifests.add(&file, i + 1, doc, &mut seen);
            }
        }
        Ok(manifests)
    }

    fn error(&mut self, file: &Path, document: usize, field: &str, message: impl Into<String>) {
        self.errors.push(ManifestError {
            file: file.to_path_buf(),
            document,
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn add(
        &mut self,
        file: &Path,
        document: usize,
        doc: serde_json::Value,
        seen: &mut BTreeSet<(String, ObjectKey)>,
    ) {
        let kind = doc
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let api_version = doc
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let expected = match kind.as_str() {
            "Webhook" | "NotificationCondition" => "herald.dev/v1alpha1",
            "Secret" => "v1",
            "" => {
                self.error(file, document, "kind", "missing");
                return;
            }
            other => {
                self.error(
                    file,
                    document,
                    "kind",
                    format!("unsupported kind {other:?}: expected Webhook, NotificationCondition or Secret"),
                );
                return;
            }
        };
        if api_version != expected {
            self.error(
                file,
                document,
                "apiVersion",
                format!("{kind} needs apiVersion {expected}, found {api_version:?}"),
            );
            return;
        }
        let parsed = match kind.as_str() {
            "Webhook" => typed::<Webhook>(doc).map(|wh| Parsed::Webhook(Box::new(wh))),
            "NotificationCondition" => typed::<NotificationCondition>(doc).map(Parsed::Condition),
            _ => typed::<Secret>(doc).map(Parsed::Secret),
        };
        let mut parsed = match parsed {
            Ok(parsed) => parsed,
            Err((field, message)) => {
                self.error(file, document, &field, message);
                return;
            }
        };
        let problems = match &parsed {
            Parsed::Webhook(wh) => crate::crd::validate_webhook(wh).err().map(cel_errors),
            Parsed::Condition(nc) => crate::crd::validate_condition(nc).err().map(cel_errors),
            Parsed::Secret(_) => None,
        };
        if let Some(problems) = problems {
            for (field, message) in problems {
                self.error(file, document, &field, message);
            }
            return;
        }
        let Some(key) = object_key(parsed.metadata_mut()) else {
            self.error(file, document, "metadata.name", "required");
            return;
        };
        if !seen.insert((kind.clone(), key.clone())) {
            self.error(
                file,
                document,
                "metadata.name",
                format!("{kind} {key} is defined twice"),
            );
            return;
        }
        match parsed {
            Parsed::Webhook(wh) => self.webhooks.push(wh),
            Parsed::Condition(nc) => self.conditions.push(Box::new(nc)),
            Parsed::Secret(secret) => {
                self.secrets.insert(key, SecretData::from_secret(&secret));
            }
        }
    }
}

/// One parsed manifest.
enum Parsed {
    Webhook(Box<Webhook>),
    Condition(NotificationCondition),
    Secret(Secret),
}

impl Parsed {
    fn metadata_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Parsed::Webhook(o) => &mut o.metadata,
            Parsed::Condition(o) => &mut o.metadata,
            Parsed::Secret(o) => &mut o.metadata,
        }
    }
}

/// Fills in the default namespace and returns the object's key (None without a name).
fn object_key(
    meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjectKey> {
    let namespace = meta
        .namespace
        .get_or_insert_with(|| DEFAULT_NAMESPACE.to_string())
        .clone();
    let name = meta.name.clone().filter(|n| !n.is_empty())?;
    Some(ObjectKey::new(namespace, name))
}

/// Keeps the core in step with a folder: applies what changed, removes what went away.
#[derive(Debug)]
pub struct Loader {
    dir: PathBuf,
    /// The fingerprint of each Webhook applied (its spec, labels and Secrets).
    webhooks: Relist<u64>,
    /// The fingerprint of each condition applied.
    conditions: Relist<u64>,
    content: Option<u64>,
}

/// What one reload did.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Webhooks applied (new or changed).
    pub applied: usize,
    /// Webhooks and conditions removed.
    pub removed: usize,
    /// Readiness of every webhook that was applied.
    pub not_ready: Vec<(ObjectKey, NotReady)>,
    /// Manifest errors.
    pub errors: Vec<ManifestError>,
}

fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for part in parts {
        part.hash(&mut hasher);
    }
    hasher.finish()
}

impl Loader {
    /// A loader for a folder; nothing is read until [`Loader::reload`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Loader {
            dir: dir.into(),
            webhooks: Relist::default(),
            conditions: Relist::default(),
            content: None,
        }
    }

    /// A digest of every manifest file's path and content, to notice changes cheaply.
    fn content_digest(&self) -> std::io::Result<u64> {
        let mut files = Vec::new();
        manifest_files(&self.dir, &mut files)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for file in files {
            file.hash(&mut hasher);
            std::fs::read(&file).unwrap_or_default().hash(&mut hasher);
        }
        Ok(hasher.finish())
    }

    /// Reloads when the folder's content changed since the last load; `None` when unchanged.
    pub fn reload_if_changed(
        &mut self,
        dispatcher: &Dispatcher,
    ) -> std::io::Result<Option<ReloadReport>> {
        let digest = self.content_digest()?;
        if self.content == Some(digest) {
            return Ok(None);
        }
        let report = self.reload(dispatcher)?;
        self.content = Some(digest);
        Ok(Some(report))
    }

    /// Reads the folder and applies every change to the core.
    pub fn reload(&mut self, dispatcher: &Dispatcher) -> std::io::Result<ReloadReport> {
        let Manifests {
            webhooks: manifest_webhooks,
            conditions: manifest_conditions,
            secrets,
            errors,
        } = Manifests::load(&self.dir)?;
        let mut report = ReloadReport {
            errors,
            ..ReloadReport::default()
        };

        // Manifests are consumed as they are applied: the parsed objects and the table never
        // both hold everything. Each reading is a list: what it does not name is gone.
        self.conditions.begin();
        for nc in manifest_conditions {
            let key = ObjectKey::new(nc.namespace().unwrap_or_default(), nc.name_any());
            let fp = fingerprint(&[&serde_json::to_vec(&nc.spec).unwrap_or_default()]);
            if self.conditions.apply(key.clone(), fp) != Some(fp) {
                dispatcher.apply_condition(ConditionInput { key, spec: nc.spec });
            }
        }

        self.webhooks.begin();
        for wh in manifest_webhooks {
            let wh = *wh;
            let key = ObjectKey::new(wh.namespace().unwrap_or_default(), wh.name_any());
            let secret = |name: &str| secrets.get(&ObjectKey::new(key.namespace.clone(), name));
            let mut parts: Vec<Vec<u8>> = vec![
                serde_json::to_vec(&wh.spec).unwrap_or_default(),
                serde_json::to_vec(&wh.metadata.labels).unwrap_or_default(),
            ];
            for name in referenced_secrets(&wh.spec) {
                parts.push(name.clone().into_bytes());
                parts.push(
                    secret(&name)
                        .map(|d| d.digest().to_vec())
                        .unwrap_or_default(),
                );
            }
            let fp = fingerprint(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
            if self.webhooks.apply(key.clone(), fp) != Some(fp) {
                // Readiness is collected for every webhook below.
                let _readiness = dispatcher.apply_webhook(
                    key.clone(),
                    wh.metadata.labels.unwrap_or_default(),
                    wh.spec,
                    secret,
                );
                report.applied += 1;
            }
        }

        for (key, _) in self.webhooks.finish() {
            dispatcher.delete_webhook(&key);
            report.removed += 1;
        }
        for (key, _) in self.conditions.finish() {
            dispatcher.delete_condition(&key);
            report.removed += 1;
        }

        let table = dispatcher.table();
        for key in table.webhook_keys() {
            if let Some(Err(not_ready)) = table.readiness(&key) {
                report.not_ready.push((key, not_ready));
            }
        }
        Ok(report)
    }
}

/// Logs what a reload did: errors with file and field, webhooks that cannot deliver.
pub fn log_report(report: &ReloadReport) {
    for error in &report.errors {
        tracing::error!("{error}");
    }
    for (key, not_ready) in &report.not_ready {
        tracing::warn!(webhook = %key, reason = %not_ready.reason, "webhook not ready: {}", not_ready.message);
    }
    tracing::info!(
        applied = report.applied,
        removed = report.removed,
        errors = report.errors.len(),
        "configuration loaded"
    );
}

/// Reloads the folder every `interval` until `cancel` fires.
pub async fn watch(
    mut loader: Loader,
    dispatcher: Dispatcher,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match loader.reload_if_changed(&dispatcher) {
            Ok(Some(report)) => log_report(&report),
            Ok(None) => {}
            Err(e) => tracing::error!("cannot read the configuration folder: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_errors_never_show_the_secret_around_them() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join("secret.yaml"),
            "apiVersion: v1\nkind: Secret\nmetadata: {name: a}\nstringData:\n  token: sup3r-s3cret-t0ken\n   bad: [indent\n",
        )
        .expect("write");
        let manifests = Manifests::load(dir.path()).expect("load");
        let text: String = manifests.errors.iter().map(|e| format!("{e}\n")).collect();
        assert!(text.contains("invalid YAML"), "{text}");
        assert!(!text.contains("sup3r-s3cret-t0ken"), "{text}");
        assert!(!text.contains("indent"), "{text}");
    }
}
