//! Lease-based leader election: every replica receives and delivers; only the leader writes
//! status, publishes Events, sends test messages and delivers Kubernetes Events.
//!
//! Leadership is one `tokio::sync::watch` of a `bool`: the elector sends, everything that acts
//! only as leader reads it. The Lease also carries the leader's resume point in the Kubernetes
//! Event stream (see [`EventsBookmark`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The Lease annotation holding [`EventsBookmark`]: the resource version up to which the leader
/// has queued Kubernetes Events, per watched scope (a namespace, or "" for all).
pub const EVENTS_RESUME_ANNOTATION: &str = "herald.dev/events-resume";

/// Where the leader is in the Kubernetes Event stream, per watched scope, shared between the
/// Event watches (which move it as they queue Events) and the elector (which reads it from the
/// Lease when it takes leadership and writes it back with every renewal and at release).
///
/// It lives in the Lease because only the holder can write the Lease (every write is a
/// compare-and-swap on its resourceVersion): a replica that lost leadership cannot move it, the
/// new leader reads it in the same request that makes it leader, and it needs no other object
/// or permission than the election already has.
#[derive(Clone, Debug, Default)]
pub struct EventsBookmark(Arc<Mutex<BTreeMap<String, String>>>);

impl EventsBookmark {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The resource version to resume a scope's watch from, if one is stored.
    pub fn get(&self, scope: &str) -> Option<String> {
        self.lock().get(scope).cloned()
    }

    /// Moves a scope's resume point.
    pub fn set(&self, scope: &str, resource_version: &str) {
        self.lock()
            .insert(scope.to_string(), resource_version.to_string());
    }

    /// Forgets a scope's resume point (it expired): the next watch starts from a fresh list.
    pub fn clear(&self, scope: &str) {
        self.lock().remove(scope);
    }

    fn encode(&self) -> String {
        serde_json::to_string(&*self.lock()).unwrap_or_default()
    }

    /// Takes the resume points stored in a Lease (an unreadable value counts as none).
    fn load(&self, lease: &Lease) {
        let stored = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(EVENTS_RESUME_ANNOTATION))
            .and_then(|v| serde_json::from_str::<BTreeMap<String, String>>(v).ok())
            .unwrap_or_default();
        *self.lock() = stored;
    }

    /// Stores the resume points in a Lease about to be written.
    fn store(&self, lease: &mut Lease) {
        lease
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(EVENTS_RESUME_ANNOTATION.to_string(), self.encode());
    }
}

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (Herald's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How often the leader renews and followers retry.
    pub retry_period: Duration,
}

enum Decision {
    Lead,
    Follow,
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().map(|t| t.0) else {
        return true;
    };
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    renewed + SignedDuration::from_secs(seconds) < now
}

async fn try_acquire(
    api: &Api<Lease>,
    config: &LeaseConfig,
    leading: bool,
    bookmark: &EventsBookmark,
) -> Result<Decision, kube::Error> {
    let now = Timestamp::now();
    let duration = i32::try_from(config.duration.as_secs()).unwrap_or(15);
    match api.get_opt(&config.name).await? {
        None => {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            // A new Lease: no resume point yet.
            bookmark.store(&mut lease);
            api.create(&PostParams::default(), &lease).await?;
            Ok(Decision::Lead)
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
            if !mine && !expired(spec, now) && spec.holder_identity.is_some() {
                return Ok(Decision::Follow);
            }
            if !mine {
                spec.holder_identity = Some(config.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(duration);
            if leading {
                bookmark.store(&mut lease);
            } else {
                // Taking over: resume where the previous leader left off.
                bookmark.load(&lease);
            }
            // The resourceVersion in `lease` makes this a compare-and-swap.
            api.replace(&config.name, &PostParams::default(), &lease)
                .await?;
            Ok(Decision::Lead)
        }
    }
}

async fn release(api: &Api<Lease>, config: &LeaseConfig, bookmark: &EventsBookmark) {
    if let Ok(Some(mut lease)) = api.get_opt(&config.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(config.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        bookmark.store(&mut lease);
        let _ = api
            .replace(&config.name, &PostParams::default(), &lease)
            .await;
    }
}

/// Runs the election until `cancel` fires, keeping `leader` current (true while this replica
/// holds the Lease) and `bookmark` in step with the Lease. Releases the Lease on the way out.
pub async fn run(
    client: kube::Client,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    bookmark: EventsBookmark,
    cancel: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    loop {
        let was = *leader.borrow();
        let lead = match try_acquire(&api, &config, was, &bookmark).await {
            Ok(Decision::Lead) => true,
            Ok(Decision::Follow) => false,
            Err(kube::Error::Api(status)) if status.code == 409 => false,
            Err(e) => {
                tracing::warn!("leader election: {e}");
                false
            }
        };
        if lead && !was {
            tracing::info!(identity = %config.identity, "elected leader");
        } else if !lead && was {
            tracing::warn!(identity = %config.identity, "lost leadership");
        }
        leader.send_if_modified(|current| std::mem::replace(current, lead) != lead);
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(config.retry_period) => {}
        }
    }
    if leader.send_replace(false) {
        release(&api, &config, &bookmark).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_resume_point_travels_in_the_lease() {
        let leader = EventsBookmark::default();
        leader.set("", "41");
        leader.set("shop", "42");
        let mut lease = Lease::default();
        leader.store(&mut lease);

        let successor = EventsBookmark::default();
        successor.set("stale", "1");
        successor.load(&lease);
        assert_eq!(successor.get(""), Some("41".to_string()));
        assert_eq!(successor.get("shop"), Some("42".to_string()));
        assert_eq!(
            successor.get("stale"),
            None,
            "the Lease's points replace its own"
        );
        successor.clear("shop");
        assert_eq!(successor.get("shop"), None);

        // An unreadable annotation counts as no resume point.
        lease
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(EVENTS_RESUME_ANNOTATION.to_string(), "not json".to_string());
        successor.load(&lease);
        assert_eq!(successor.get(""), None);
    }
}
