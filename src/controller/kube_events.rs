//! The leader's watch of Kubernetes Events (events.k8s.io/v1) for `Events` webhooks. It runs
//! only while this replica leads and the table is complete, and resumes from the
//! [`EventsBookmark`] the previous leader left in the Lease: the Events created while no leader
//! ran are delivered once, and those it delivered are not delivered again.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::alert::AlertBatch;
use crate::crd::WebhookType;
use crate::dispatch::Dispatcher;
use crate::events::{EventLedger, to_alert};

use super::ReconcileError;
use super::leader::EventsBookmark;

/// How many Events one page of a baseline list holds.
const PAGE: u32 = 500;

/// How long queueing one Event may wait for room before it is given up (and logged).
const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Follows the Events of every watched scope (each namespace, or all) until `cancel` fires.
pub async fn follow(
    client: Client,
    namespaces: Vec<String>,
    dispatcher: Dispatcher,
    bookmark: EventsBookmark,
    cancel: CancellationToken,
) {
    let scopes: Vec<(String, Api<Event>)> = if namespaces.is_empty() {
        vec![(String::new(), Api::all(client))]
    } else {
        namespaces
            .into_iter()
            .map(|ns| {
                let api = Api::namespaced(client.clone(), &ns);
                (ns, api)
            })
            .collect()
    };
    futures::future::join_all(scopes.into_iter().map(|(scope, api)| {
        follow_scope(
            api,
            scope,
            dispatcher.clone(),
            bookmark.clone(),
            cancel.clone(),
        )
    }))
    .await;
}

/// Follows one scope, starting again (with backoff) after each error.
async fn follow_scope(
    api: Api<Event>,
    scope: String,
    dispatcher: Dispatcher,
    bookmark: EventsBookmark,
    cancel: CancellationToken,
) {
    let mut ledger = EventLedger::default();
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = follow_once(&api, &scope, &dispatcher, &bookmark, &mut ledger) => result,
        };
        match result {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(error) => {
                tracing::warn!("{error} (retrying)");
                dispatcher.metrics().controller.watch_error("Event");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Lists a scope's Events (they exist before any resume point: old news), remembering their
/// counts, and returns the list's resource version to watch from.
async fn baseline(api: &Api<Event>, ledger: &mut EventLedger) -> Result<String, ReconcileError> {
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(ReconcileError::EventWatch)?;
        for event in &page.items {
            ledger.record(event);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(page.metadata.resource_version.unwrap_or_default()),
        }
    }
}

/// Watches a scope from its resume point (or from a fresh list when none is stored) until the
/// watch ends.
async fn follow_once(
    api: &Api<Event>,
    scope: &str,
    dispatcher: &Dispatcher,
    bookmark: &EventsBookmark,
    ledger: &mut EventLedger,
) -> Result<(), ReconcileError> {
    let version = match bookmark.get(scope) {
        Some(version) => version,
        None => {
            let version = baseline(api, ledger).await?;
            bookmark.set(scope, &version);
            version
        }
    };
    let params = WatchParams::default().timeout(290);
    let mut stream = api
        .watch(&params, &version)
        .await
        .map_err(ReconcileError::EventWatch)?
        .boxed();
    while let Some(item) = stream
        .try_next()
        .await
        .map_err(ReconcileError::EventWatch)?
    {
        let version = match item {
            WatchEvent::Added(event) | WatchEvent::Modified(event) => {
                if ledger.record(&event) {
                    deliver(dispatcher, &event).await;
                }
                event.resource_version()
            }
            WatchEvent::Deleted(event) => {
                ledger.forget(&event);
                event.resource_version()
            }
            WatchEvent::Bookmark(mark) => Some(mark.metadata.resource_version),
            WatchEvent::Error(status) if status.code == 410 => {
                tracing::warn!(
                    scope,
                    "the Kubernetes Event resume point has expired: Events since it are not delivered; following from now"
                );
                dispatcher.metrics().controller.watch_restart("Event");
                bookmark.clear(scope);
                return Ok(());
            }
            WatchEvent::Error(status) => {
                return Err(ReconcileError::EventWatch(kube::Error::Api(status)));
            }
        };
        if let Some(version) = version.filter(|v| !v.is_empty()) {
            bookmark.set(scope, &version);
        }
    }
    Ok(())
}

/// Queues one Event for the `Events` webhooks it matches, waiting until it is kept.
async fn deliver(dispatcher: &Dispatcher, event: &Event) {
    let Some(alert) = to_alert(event) else {
        return;
    };
    let batch = AlertBatch {
        alerts: vec![alert],
        ..Default::default()
    };
    if let Err(e) = dispatcher
        .dispatch_within(batch, WebhookType::Events, QUEUE_WAIT)
        .await
    {
        let error = ReconcileError::EventQueue(e.to_string());
        tracing::warn!("{error}");
        dispatcher
            .metrics()
            .controller
            .error("Event", error.metric_label());
    }
}
