//! Lease-based leader election: every replica receives and delivers; only the leader writes
//! status, publishes Events and sends test messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

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

async fn try_acquire(api: &Api<Lease>, config: &LeaseConfig) -> Result<Decision, kube::Error> {
    let now = Timestamp::now();
    let duration = i32::try_from(config.duration.as_secs()).unwrap_or(15);
    match api.get_opt(&config.name).await? {
        None => {
            let lease = Lease {
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
            // The resourceVersion in `lease` makes this a compare-and-swap.
            api.replace(&config.name, &PostParams::default(), &lease)
                .await?;
            Ok(Decision::Lead)
        }
    }
}

async fn release(api: &Api<Lease>, config: &LeaseConfig) {
    if let Ok(Some(mut lease)) = api.get_opt(&config.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(config.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        let _ = api
            .replace(&config.name, &PostParams::default(), &lease)
            .await;
    }
}

/// Runs the election until `cancel` fires, keeping `leader` current and calling `on_elected`
/// each time this replica becomes leader. Releases the lease on the way out.
pub async fn run(
    client: kube::Client,
    config: LeaseConfig,
    leader: Arc<AtomicBool>,
    on_elected: impl Fn() + Send + 'static,
    cancel: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    loop {
        let lead = match try_acquire(&api, &config).await {
            Ok(Decision::Lead) => true,
            Ok(Decision::Follow) => false,
            Err(kube::Error::Api(status)) if status.code == 409 => false,
            Err(e) => {
                tracing::warn!("leader election: {e}");
                false
            }
        };
        let was = leader.swap(lead, Ordering::SeqCst);
        if lead && !was {
            tracing::info!(identity = %config.identity, "elected leader");
            on_elected();
        } else if !lead && was {
            tracing::warn!(identity = %config.identity, "lost leadership");
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(config.retry_period) => {}
        }
    }
    if leader.swap(false, Ordering::SeqCst) {
        release(&api, &config).await;
    }
}
