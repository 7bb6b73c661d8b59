//! The folder backend of `herald run`: the console edits the manifests in the config folder,
//! which stays the source of truth (the running reload picks every change up). A webhook made
//! or changed here lives in `<namespace>.<name>.yaml` with its Secret and its condition.

use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use crate::crd::{
    DeliveryOutcome, DeliveryResult, NotificationCondition, TestResult, Webhook, WebhookStatus,
};
use crate::dispatch::Dispatcher;
use crate::object::ObjectKey;
use crate::outgoing::ReportOutcome;
use crate::secret::{SecretData, Sensitive};
use crate::standalone::{DEFAULT_NAMESPACE, Manifests, manifest_files};
use crate::store::RecordFilter;

use super::auth::Identity;
use super::backend::{Backend, ConsoleError, EventRow, Permissions, Save, TestRequested};
use super::form::{FieldErrors, condition_name, form_field, secret_name};

/// Edits the config folder; the console token guards it.
#[derive(Clone)]
pub struct FolderBackend {
    dir: PathBuf,
    token: Sensitive<String>,
    dispatcher: Dispatcher,
}

impl std::fmt::Debug for FolderBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FolderBackend({})", self.dir.display())
    }
}

fn io_error(e: impl std::fmt::Display) -> ConsoleError {
    ConsoleError::Failed(e.to_string())
}

/// The (kind, namespace, name) of a manifest document.
fn identity_of(doc: &Value) -> (String, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_string();
    (
        text(&doc["kind"]),
        namespace,
        text(&doc["metadata"]["name"]),
    )
}

/// Writes a file whole or not at all (a hidden temporary name, which the loader skips, then a rename).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.console-tmp"));
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

fn to_yaml(docs: &[Value]) -> Result<String, ConsoleError> {
    let mut text = String::new();
    for doc in docs {
        text.push_str("---\n");
        text.push_str(&serde_saphyr::to_string(doc).map_err(io_error)?);
    }
    Ok(text)
}

impl FolderBackend {
    /// A backend for the folder `dir`, for holders of `token`, with `dispatcher` for tests and records.
    pub fn new(dir: impl Into<PathBuf>, token: Sensitive<String>, dispatcher: Dispatcher) -> Self {
        FolderBackend {
            dir: dir.into(),
            token,
            dispatcher,
        }
    }

    fn load(&self) -> Result<Manifests, ConsoleError> {
        Manifests::load(&self.dir).map_err(io_error)
    }

    /// Removes the documents `matches` accepts from every file (deleting files left empty);
    /// returns the file the first removed Webhook was in.
    fn remove_documents(
        &self,
        matches: impl Fn(&(String, String, String)) -> bool,
    ) -> Result<Option<PathBuf>, ConsoleError> {
        let mut files = Vec::new();
        manifest_files(&self.dir, &mut files).map_err(io_error)?;
        let mut webhook_file = None;
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let Ok(docs) = serde_saphyr::from_multiple::<Value>(&text) else {
                continue;
            };
            let before = docs.len();
            let kept: Vec<Value> = docs
                .into_iter()
                .filter(|doc| {
                    let id = identity_of(doc);
                    let remove = !doc.is_null() && matches(&id);
                    if remove && id.0 == "Webhook" && webhook_file.is_none() {
                        webhook_file = Some(file.clone());
                    }
                    !remove
                })
                .collect();
            if kept.len() == before {
                continue;
            }
            if kept.iter().all(Value::is_null) {
                std::fs::remove_file(&file).map_err(io_error)?;
            } else {
                write_atomically(&file, &to_yaml(&kept)?).map_err(io_error)?;
            }
        }
        Ok(webhook_file)
    }

    fn file_for(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join(format!("{namespace}.{name}.yaml"))
    }

    async fn status_of(&self, key: &ObjectKey) -> WebhookStatus {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let ready = self.dispatcher.table().readiness(key);
        let condition = match ready {
            Some(Ok(())) => Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Ready".into(),
                message: String::new(),
                last_transition_time: now.clone(),
                observed_generation: None,
            },
            Some(Err(not_ready)) => Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: not_ready.reason.as_str().to_string(),
                message: not_ready.message.clone(),
                last_transition_time: now.clone(),
                observed_generation: None,
            },
            None => Condition {
                type_: "Ready".into(),
                status: "Unknown".into(),
                reason: "NotLoaded".into(),
                message: "the folder has not been reloaded since this change".into(),
                last_transition_time: now.clone(),
                observed_generation: None,
            },
        };
        let records = self
            .dispatcher
            .engine()
            .store()
            .records(&RecordFilter {
                webhook: Some(key.clone()),
                outcome: None,
                limit: 200,
            })
            .await
            .unwrap_or_default();
        let outcome = |o: ReportOutcome| {
            if o == ReportOutcome::Succeeded {
                DeliveryOutcome::Succeeded
            } else {
                DeliveryOutcome::Failed
            }
        };
        let last_delivery = records.iter().find(|r| !r.test).map(|r| DeliveryResult {
            time: Time(r.time),
            outcome: outcome(r.outcome),
            http_status: r.http_status,
            message: r.error.clone(),
        });
        let last_test = records.iter().find(|r| r.test).map(|r| TestResult {
            token: r.id.to_string(),
            time: Time(r.time),
            outcome: outcome(r.outcome),
            http_status: r.http_status,
            message: r.error.clone(),
        });
        WebhookStatus {
            observed_generation: None,
            conditions: vec![condition],
            last_delivery,
            last_test,
        }
    }
}

fn cel_field_errors(errors: kube::core::cel::ValidationErrors) -> FieldErrors {
    let mut out = FieldErrors::new();
    for e in errors.as_slice() {
        out.entry(form_field(&e.field_path))
            .or_insert_with(|| e.message.clone());
    }
    out
}

impl Backend for FolderBackend {
    fn admits(&self, who: &Identity) -> bool {
        self.token_matches(who.token.expose())
    }

    async fn sign_in(&self, token: &str) -> Result<(), ConsoleError> {
        if self.token_matches(token) {
            Ok(())
        } else {
            Err(ConsoleError::Unauthorized("wrong console token".into()))
        }
    }

    async fn permissions(&self, _who: &Identity, _namespace: &str) -> Permissions {
        Permissions::all()
    }

    async fn webhooks(
        &self,
        _who: &Identity,
        namespace: Option<&str>,
    ) -> Result<Vec<Webhook>, ConsoleError> {
        let mut out = Vec::new();
        for webhook in self.load()?.webhooks {
            let mut webhook = *webhook;
            let ns = webhook.metadata.namespace.clone().unwrap_or_default();
            if namespace.is_some_and(|n| n != ns) {
                continue;
            }
            let key = ObjectKey::new(ns, webhook.metadata.name.clone().unwrap_or_default());
            webhook.status = Some(self.status_of(&key).await);
            out.push(webhook);
        }
        Ok(out)
    }

    async fn webhook(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Webhook>, ConsoleError> {
        Ok(self
            .webhooks(who, Some(namespace))
            .await?
            .into_iter()
            .find(|w| w.metadata.name.as_deref() == Some(name)))
    }

    async fn conditions(
        &self,
        _who: &Identity,
        namespace: Option<&str>,
    ) -> Result<Vec<NotificationCondition>, ConsoleError> {
        Ok(self
            .load()?
            .conditions
            .into_iter()
            .map(|c| *c)
            .filter(|c| namespace.is_none_or(|n| c.metadata.namespace.as_deref() == Some(n)))
            .collect())
    }

    async fn save(&self, _who: &Identity, save: Save) -> Result<(), ConsoleError> {
        crate::crd::validate_webhook(&save.webhook)
            .map_err(|e| ConsoleError::Invalid(cel_field_errors(e)))?;
        if let Some(nc) = &save.condition {
            crate::crd::validate_condition(nc)
                .map_err(|e| ConsoleError::Invalid(cel_field_errors(e)))?;
        }
        let namespace = save.webhook.metadata.namespace.clone().unwrap_or_default();
        let name = save.webhook.metadata.name.clone().unwrap_or_default();
        let manifests = self.load()?;
        let exists = manifests.webhooks.iter().any(|w| {
            w.metadata.namespace.as_deref() == Some(namespace.as_str())
                && w.metadata.name.as_deref() == Some(name.as_str())
        });
        if save.create && exists {
            return Err(ConsoleError::Invalid(FieldErrors::from([(
                "name".to_string(),
                format!("webhook {namespace}/{name} already exists"),
            )])));
        }
        if !save.create && !exists {
            return Err(ConsoleError::NotFound(format!(
                "webhook {namespace}/{name}"
            )));
        }
        // The Secret stays where it is unless new credentials replace it.
        let kept_secret: Option<Value> = if save.credentials.is_none() {
            self.documents_of("Secret", &namespace, &secret_name(&name))?
        } else {
            None
        };
        let auth = secret_name(&name);
        let own_condition = condition_name(&name);
        self.remove_documents(|(kind, ns, n)| {
            ns == &namespace
                && ((kind == "Webhook" && n == &name)
                    || (kind == "NotificationCondition" && n == &own_condition)
                    || (kind == "Secret" && n == &auth))
        })?;
        let mut webhook = serde_json::to_value(&save.webhook).map_err(io_error)?;
        if let Some(meta) = webhook["metadata"].as_object_mut() {
            meta.retain(|k, _| {
                matches!(k.as_str(), "name" | "namespace" | "labels" | "annotations")
            });
        }
        let mut docs = vec![webhook];
        if let Some(credentials) = save.credentials {
            docs.push(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": auth, "namespace": namespace, "labels": {super::cluster::CONSENT_LABEL: "true"}},
                "stringData": credentials,
            }));
        } else if let Some(secret) = kept_secret {
            docs.push(secret);
        }
        if let Some(nc) = save.condition {
            let mut nc = serde_json::to_value(&nc).map_err(io_error)?;
            if let Some(obj) = nc.as_object_mut() {
                obj.remove("status");
            }
            docs.push(nc);
        }
        write_atomically(&self.file_for(&namespace, &name), &to_yaml(&docs)?).map_err(io_error)
    }

    async fn set_enabled(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
        enabled: bool,
    ) -> Result<(), ConsoleError> {
        self.edit_webhook_document(namespace, name, |doc| {
            doc["spec"]["enabled"] = json!(enabled);
        })?;
        let _ = who;
        Ok(())
    }

    async fn delete(
        &self,
        _who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<(), ConsoleError> {
        let auth = secret_name(name);
        let own_condition = condition_name(name);
        let file = self
            .remove_documents(|(kind, ns, n)| ns == namespace && kind == "Webhook" && n == name)?;
        let Some(file) = file else {
            return Err(ConsoleError::NotFound(format!(
                "webhook {namespace}/{name}"
            )));
        };
        // What the console made along with it lives in the same file.
        if file.exists() {
            let text = std::fs::read_to_string(&file).map_err(io_error)?;
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text).map_err(io_error)?;
            let kept: Vec<Value> = docs
                .into_iter()
                .filter(|doc| {
                    let (kind, ns, n) = identity_of(doc);
                    !(ns == namespace
                        && ((kind == "Secret" && n == auth)
                            || (kind == "NotificationCondition" && n == own_condition)))
                })
                .filter(|doc| !doc.is_null())
                .collect();
            if kept.is_empty() {
                std::fs::remove_file(&file).map_err(io_error)?;
            } else {
                write_atomically(&file, &to_yaml(&kept)?).map_err(io_error)?;
            }
        }
        Ok(())
    }

    async fn send_test(
        &self,
        _who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<TestRequested, ConsoleError> {
        let key = ObjectKey::new(namespace, name);
        match self.dispatcher.send_test(&key).await {
            Ok(report) => Ok(TestRequested::Sent(super::TestView {
                outcome: format!("{:?}", report.outcome),
                status: report
                    .http_status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                latency_ms: u64::try_from(report.latency.as_millis()).unwrap_or(u64::MAX),
                error: if report.outcome == ReportOutcome::Succeeded {
                    String::new()
                } else {
                    report.message
                },
            })),
            Err(e) => Err(ConsoleError::Failed(e.to_string())),
        }
    }

    async fn secret(
        &self,
        _who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SecretData>, ConsoleError> {
        Ok(self
            .load()?
            .secrets
            .remove(&ObjectKey::new(namespace, name)))
    }

    async fn events(
        &self,
        _who: &Identity,
        _namespace: &str,
        _name: &str,
    ) -> Result<Vec<EventRow>, ConsoleError> {
        Ok(Vec::new())
    }
}

impl FolderBackend {
    fn token_matches(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        !token.is_empty() && bool::from(token.as_bytes().ct_eq(self.token.expose().as_bytes()))
    }

    /// The first document of this kind, namespace and name, as written in its file.
    fn documents_of(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, ConsoleError> {
        let mut files = Vec::new();
        manifest_files(&self.dir, &mut files).map_err(io_error)?;
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let Ok(docs) = serde_saphyr::from_multiple::<Value>(&text) else {
                continue;
            };
            if let Some(doc) = docs.into_iter().find(|d| {
                let (k, ns, n) = identity_of(d);
                k == kind && ns == namespace && n == name
            }) {
                return Ok(Some(doc));
            }
        }
        Ok(None)
    }

    /// Changes one Webhook document in place, in whatever file holds it.
    fn edit_webhook_document(
        &self,
        namespace: &str,
        name: &str,
        edit: impl Fn(&mut Value),
    ) -> Result<(), ConsoleError> {
        let mut files = Vec::new();
        manifest_files(&self.dir, &mut files).map_err(io_error)?;
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let Ok(mut docs) = serde_saphyr::from_multiple::<Value>(&text) else {
                continue;
            };
            let mut found = false;
            for doc in &mut docs {
                let (kind, ns, n) = identity_of(doc);
                if kind == "Webhook" && ns == namespace && n == name {
                    edit(doc);
                    found = true;
                }
            }
            if found {
                docs.retain(|d| !d.is_null());
                return write_atomically(&file, &to_yaml(&docs)?).map_err(io_error);
            }
        }
        Err(ConsoleError::NotFound(format!(
            "webhook {namespace}/{name}"
        )))
    }
}
