//! The cluster backend: every request is made with the signed-in user's own bearer token, so
//! the API server's RBAC decides. Herald's own credentials are never used here.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};

use crate::crd::{NotificationCondition, TEST_ANNOTATION, Webhook};
use crate::secret::SecretData;

use super::auth::Identity;
use super::backend::{Backend, ConsoleError, EventRow, Permissions, Save, TestRequested};
use super::form::{FieldErrors, condition_name, form_field, secret_name};

/// The label Herald requires on Secrets it may use.
pub const CONSENT_LABEL: &str = "herald.dev/use";

/// Reaches the API server as whoever is signed in.
#[derive(Clone)]
pub struct ClusterBackend {
    /// Where the API server is and how to trust it; no credentials of its own.
    base: kube::Config,
}

impl std::fmt::Debug for ClusterBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterBackend({})", self.base.cluster_url)
    }
}

impl ClusterBackend {
    /// A backend for the API server of `config`, whose own credentials are dropped.
    pub fn new(mut config: kube::Config) -> Self {
        config.auth_info = kube::config::AuthInfo::default();
        config.headers.clear();
        ClusterBackend { base: config }
    }

    fn client(&self, token: &str) -> Result<kube::Client, ConsoleError> {
        let mut config = self.base.clone();
        config.auth_info = kube::config::AuthInfo {
            token: Some(secrecy::SecretString::from(token.to_string())),
            ..kube::config::AuthInfo::default()
        };
        kube::Client::try_from(config).map_err(|e| ConsoleError::Failed(e.to_string()))
    }

    fn user(&self, who: &Identity) -> Result<kube::Client, ConsoleError> {
        self.client(who.token.expose())
    }

    async fn allowed(
        &self,
        client: &kube::Client,
        namespace: &str,
        verb: &str,
        resource: &str,
        group: &str,
    ) -> Result<bool, ConsoleError> {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_string()),
                    verb: Some(verb.to_string()),
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(api_error)?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }

    fn webhooks_api(client: &kube::Client, namespace: Option<&str>) -> Api<Webhook> {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// The API server's refusal as the console's error.
fn api_error(e: kube::Error) -> ConsoleError {
    match e {
        kube::Error::Api(status) => match status.code {
            401 => ConsoleError::Unauthorized(status.message),
            403 => ConsoleError::Forbidden(status.message),
            404 => ConsoleError::NotFound(status.message),
            422 | 409 | 400 => {
                let mut errors = FieldErrors::new();
                for cause in status.details.iter().flat_map(|d| d.causes.iter()) {
                    let field = form_field(&cause.field);
                    errors
                        .entry(field)
                        .and_modify(|m: &mut String| {
                            m.push_str("; ");
                            m.push_str(&cause.message);
                        })
                        .or_insert_with(|| cause.message.clone());
                }
                if errors.is_empty() || status.code == 409 {
                    let field = if status.code == 409 { "name" } else { "_" };
                    errors.insert(field.into(), status.message);
                }
                ConsoleError::Invalid(errors)
            }
            _ => ConsoleError::Failed(status.message),
        },
        other => ConsoleError::Failed(other.to_string()),
    }
}

fn owner(webhook: &Webhook) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Webhook::api_version(&()).into_owned(),
        kind: Webhook::kind(&()).into_owned(),
        name: webhook.metadata.name.clone()?,
        uid: webhook.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

fn owned_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    webhook: &Webhook,
) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| Some(&r.uid) == webhook.metadata.uid.as_ref())
}

impl Backend for ClusterBackend {
    fn admits(&self, _who: &Identity) -> bool {
        true
    }

    async fn sign_in(&self, token: &str) -> Result<(), ConsoleError> {
        let client = self.client(token)?;
        // Any authenticated user may ask what it may do; a wrong token gets 401.
        self.allowed(&client, "default", "list", "webhooks", crate::crd::GROUP)
            .await
            .map(|_| ())
    }

    async fn permissions(&self, who: &Identity, namespace: &str) -> Permissions {
        let Ok(client) = self.user(who) else {
            return Permissions::default();
        };
        let group = crate::crd::GROUP;
        let (create, update, delete) = tokio::join!(
            self.allowed(&client, namespace, "create", "webhooks", group),
            self.allowed(&client, namespace, "update", "webhooks", group),
            self.allowed(&client, namespace, "delete", "webhooks", group),
        );
        Permissions {
            create: create.unwrap_or(false),
            update: update.unwrap_or(false),
            delete: delete.unwrap_or(false),
        }
    }

    async fn webhooks(
        &self,
        who: &Identity,
        namespace: Option<&str>,
    ) -> Result<Vec<Webhook>, ConsoleError> {
        let client = self.user(who)?;
        let list = Self::webhooks_api(&client, namespace)
            .list(&ListParams::default())
            .await
            .map_err(api_error)?;
        Ok(list.items)
    }

    async fn webhook(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Webhook>, ConsoleError> {
        let client = self.user(who)?;
        Self::webhooks_api(&client, Some(namespace))
            .get_opt(name)
            .await
            .map_err(api_error)
    }

    async fn conditions(
        &self,
        who: &Identity,
        namespace: Option<&str>,
    ) -> Result<Vec<NotificationCondition>, ConsoleError> {
        let client = self.user(who)?;
        let api: Api<NotificationCondition> = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        Ok(api
            .list(&ListParams::default())
            .await
            .map_err(api_error)?
            .items)
    }

    async fn save(&self, who: &Identity, save: Save) -> Result<(), ConsoleError> {
        let client = self.user(who)?;
        let namespace = save.webhook.namespace().unwrap_or_default();
        let name = save.webhook.name_any();
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &namespace);
        let stored = if save.create {
            webhooks
                .create(&PostParams::default(), &save.webhook)
                .await
                .map_err(api_error)?
        } else {
            webhooks
                .replace(&name, &PostParams::default(), &save.webhook)
                .await
                .map_err(api_error)?
        };
        let owner = owner(&stored);
        if let Some(credentials) = save.credentials {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let secret_name = secret_name(&name);
            if let Some(existing) = secrets.get_opt(&secret_name).await.map_err(api_error)?
                && !owned_by(&existing.metadata, &stored)
            {
                return Err(ConsoleError::Invalid(FieldErrors::from([(
                    "secret".to_string(),
                    format!("Secret {secret_name} exists and does not belong to this webhook"),
                )])));
            }
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(secret_name.clone()),
                    namespace: Some(namespace.clone()),
                    labels: Some([(CONSENT_LABEL.to_string(), "true".to_string())].into()),
                    owner_references: owner.clone().map(|o| vec![o]),
                    ..Default::default()
                },
                string_data: Some(credentials),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply("herald-console").force(),
                    &Patch::Apply(&secret),
                )
                .await
                .map_err(api_error)?;
        }
        let conditions: Api<NotificationCondition> = Api::namespaced(client, &namespace);
        let condition = condition_name(&name);
        match save.condition {
            Some(mut nc) => {
                nc.metadata.owner_references = owner.map(|o| vec![o]);
                conditions
                    .patch(
                        &condition,
                        &PatchParams::apply("herald-console").force(),
                        &Patch::Apply(&nc),
                    )
                    .await
                    .map_err(api_error)?;
            }
            None => {
                if let Some(existing) = conditions.get_opt(&condition).await.map_err(api_error)?
                    && owned_by(&existing.metadata, &stored)
                {
                    conditions
                        .delete(&condition, &DeleteParams::default())
                        .await
                        .map_err(api_error)?;
                }
            }
        }
        Ok(())
    }

    async fn set_enabled(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
        enabled: bool,
    ) -> Result<(), ConsoleError> {
        let client = self.user(who)?;
        let patch = serde_json::json!({"spec": {"enabled": enabled}});
        Self::webhooks_api(&client, Some(namespace))
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error)?;
        Ok(())
    }

    async fn delete(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<(), ConsoleError> {
        let client = self.user(who)?;
        let webhooks = Self::webhooks_api(&client, Some(namespace));
        let stored = webhooks.get(name).await.map_err(api_error)?;
        webhooks
            .delete(name, &DeleteParams::default())
            .await
            .map_err(api_error)?;
        // The garbage collector deletes what the webhook owns; delete it too where there is
        // none (and so that it is gone at once), as the same user.
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        if let Ok(Some(secret)) = secrets.get_opt(&secret_name(name)).await
            && owned_by(&secret.metadata, &stored)
        {
            let _ = secrets
                .delete(&secret_name(name), &DeleteParams::default())
                .await;
        }
        let conditions: Api<NotificationCondition> = Api::namespaced(client, namespace);
        if let Ok(Some(condition)) = conditions.get_opt(&condition_name(name)).await
            && owned_by(&condition.metadata, &stored)
        {
            let _ = conditions
                .delete(&condition_name(name), &DeleteParams::default())
                .await;
        }
        Ok(())
    }

    async fn send_test(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<TestRequested, ConsoleError> {
        let client = self.user(who)?;
        let token = uuid::Uuid::now_v7().to_string();
        let patch = serde_json::json!({"metadata": {"annotations": {TEST_ANNOTATION: token}}});
        Self::webhooks_api(&client, Some(namespace))
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error)?;
        Ok(TestRequested::Requested)
    }

    async fn secret(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SecretData>, ConsoleError> {
        let client = self.user(who)?;
        let api: Api<Secret> = Api::namespaced(client, namespace);
        Ok(api
            .get_opt(name)
            .await
            .map_err(api_error)?
            .map(|s| SecretData::from_secret(&s)))
    }

    async fn events(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<EventRow>, ConsoleError> {
        let client = self.user(who)?;
        let api: Api<Event> = Api::namespaced(client, namespace);
        let selector = format!("involvedObject.kind=Webhook,involvedObject.name={name}");
        let mut events = api
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(api_error)?
            .items;
        let time = |e: &Event| {
            e.last_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
                .unwrap_or_default()
        };
        events.sort_by_key(|e| std::cmp::Reverse(time(e)));
        Ok(events
            .iter()
            .take(50)
            .map(|e| EventRow {
                time: time(e),
                kind: e.type_.clone().unwrap_or_default(),
                reason: e.reason.clone().unwrap_or_default(),
                message: e.message.clone().unwrap_or_default(),
                count: e.count.unwrap_or(1),
            })
            .collect())
    }
}
