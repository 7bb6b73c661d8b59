//! Prometheus metrics. Labels carry only namespaces, names, endpoints, outcomes and reasons:
//! never a URL, a header value or a credential.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::object::ObjectKey;

/// Labels of receiver counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `/api/v1/alerts` or `/api/v2/alerts`.
    pub endpoint: String,
}

/// Labels of rejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why a request was refused.
    pub reason: String,
}

/// Labels naming a webhook.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// The Webhook's namespace.
    pub namespace: String,
    /// The Webhook's name.
    pub webhook: String,
}

impl From<&ObjectKey> for WebhookLabels {
    fn from(key: &ObjectKey) -> Self {
        WebhookLabels {
            namespace: key.namespace.to_string(),
            webhook: key.name.to_string(),
        }
    }
}

/// Labels naming a namespace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    /// The Webhooks' namespace.
    pub namespace: String,
}

/// Labels of delivery outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The Webhook's namespace.
    pub namespace: String,
    /// The Webhook's name.
    pub webhook: String,
    /// succeeded, retried, failed or dropped.
    pub outcome: String,
}

/// Labels of the webhook gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    /// "true" or "false".
    pub ready: String,
}

/// One webhook's busiest metric handles, looked up once per worker rather than at every
/// delivery (a family lookup hashes and compares the label strings).
#[derive(Clone, Debug)]
pub struct WebhookMetrics {
    /// Its `herald_delivery_queue_depth`.
    pub queue_depth: Gauge,
    /// Its namespace's `herald_delivery_duration_seconds`.
    pub duration: Histogram,
    /// Its `herald_deliveries_total{outcome="succeeded"}`.
    pub succeeded: Counter,
}

/// Every metric Herald exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Alerts accepted by the receiver.
    pub alerts_received: Family<EndpointLabels, Counter>,
    /// Delivery attempts and outcomes.
    pub deliveries: Family<OutcomeLabels, Counter>,
    /// Duration of each HTTP request to a webhook, by the webhook's namespace (a histogram per
    /// webhook would be thousands of series, and kilobytes each, with thousands of webhooks).
    pub delivery_duration: Family<NamespaceLabels, Histogram>,
    /// Deliveries waiting in a webhook's queue.
    pub queue_depth: Family<WebhookLabels, Gauge>,
    /// 1 while a webhook's circuit breaker holds deliveries back; absent while it is closed.
    pub circuit_open: Family<WebhookLabels, Gauge>,
    /// Requests the receiver refused.
    pub receiver_rejected: Family<ReasonLabels, Counter>,
    /// The controller's reconciles and watches.
    pub controller: ControllerMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Where the `herald_webhooks` gauge is read from at each scrape, so that it is never stale.
pub trait WebhookReadiness: std::fmt::Debug + Send + Sync + 'static {
    /// How many webhooks are ready, and how many are not.
    fn count(&self) -> (usize, usize);
}

/// Writes `herald_webhooks{ready}` from its source at scrape time.
#[derive(Debug)]
struct WebhooksCollector<R>(R);

impl<R: WebhookReadiness> Collector for WebhooksCollector<R> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (ready, not_ready) = self.0.count();
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "webhooks",
            "Webhooks by readiness",
            None,
            gauge.metric_type(),
        )?;
        for (label, n) in [("true", ready), ("false", not_ready)] {
            let labels = ReadyLabels {
                ready: label.to_string(),
            };
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Creates and registers every metric; `herald_webhooks` is read from `readiness` at each
    /// scrape.
    pub fn new(readiness: impl WebhookReadiness) -> Self {
        let mut registry = Registry::with_prefix("herald");
        let alerts_received = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "alerts_received",
            "Alerts accepted by the receiver",
            alerts_received.clone(),
        );
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Deliveries to webhooks by outcome (succeeded, retried, failed, dropped)",
            deliveries.clone(),
        );
        let delivery_duration = Family::<NamespaceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        registry.register(
            "delivery_duration_seconds",
            "Duration of HTTP requests to webhooks, by namespace",
            delivery_duration.clone(),
        );
        let queue_depth = Family::<WebhookLabels, Gauge>::default();
        registry.register(
            "delivery_queue_depth",
            "Deliveries waiting in each webhook's queue",
            queue_depth.clone(),
        );
        registry.register_collector(Box::new(WebhooksCollector(readiness)));
        let circuit_open = Family::<WebhookLabels, Gauge>::default();
        registry.register(
            "circuit_open",
            "1 while a webhook's endpoint keeps failing and deliveries to it are held back",
            circuit_open.clone(),
        );
        let receiver_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "receiver_rejected",
            "Requests refused by the receiver, by reason",
            receiver_rejected.clone(),
        );
        let controller = ControllerMetrics::register(&mut registry);
        Metrics {
            registry,
            controller,
            alerts_received,
            deliveries,
            delivery_duration,
            queue_depth,
            circuit_open,
            receiver_rejected,
        }
    }

    /// The handles of one webhook's per-delivery metrics (created if new).
    pub fn webhook(&self, labels: &WebhookLabels) -> WebhookMetrics {
        WebhookMetrics {
            queue_depth: self.queue_depth.get_or_create(labels).clone(),
            duration: self
                .delivery_duration
                .get_or_create(&NamespaceLabels {
                    namespace: labels.namespace.clone(),
                })
                .clone(),
            succeeded: self
                .deliveries
                .get_or_create(&OutcomeLabels {
                    namespace: labels.namespace.clone(),
                    webhook: labels.webhook.clone(),
                    outcome: "succeeded".to_string(),
                })
                .clone(),
        }
    }

    /// Counts one delivery outcome for a webhook.
    pub fn delivery(&self, key: &ObjectKey, outcome: &str) {
        self.deliveries
            .get_or_create(&OutcomeLabels {
                namespace: key.namespace.to_string(),
                webhook: key.name.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a refused request.
    pub fn rejected(&self, reason: &str) {
        self.receiver_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Forgets the gauges of a webhook that no longer delivers (its counters stay).
    pub fn forget_webhook_gauges(&self, key: &ObjectKey) {
        let labels = WebhookLabels::from(key);
        self.queue_depth.remove(&labels);
        self.circuit_open.remove(&labels);
    }

    /// Forgets the per-webhook series of a deleted webhook.
    pub fn forget_webhook(&self, key: &ObjectKey) {
        self.forget_webhook_gauges(key);
        for outcome in ["succeeded", "retried", "failed", "dropped"] {
            self.deliveries.remove(&OutcomeLabels {
                namespace: key.namespace.to_string(),
                webhook: key.name.to_string(),
                outcome: outcome.to_string(),
            });
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools that do not ask for
    /// OpenMetrics: counter families carry their `_total` name, and there is no `# EOF`.
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// Labels naming a watched kind (`Webhook`, `NotificationCondition`, `Secret`, `Event`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind.
    pub kind: String,
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindErrorLabels {
    /// The kind reconciled.
    pub kind: String,
    /// What failed (a short snake_case label of the error).
    pub error: String,
}

/// The controller's own health: how often it reconciles and how long that takes, what fails,
/// and how often its watches fail or list again.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    /// Reconciles by kind.
    pub reconciles: Family<KindLabels, Counter>,
    /// Failed reconciles by kind and error.
    pub reconcile_errors: Family<KindErrorLabels, Counter>,
    /// Time from a change to its reconcile's end (Secret reads included), by kind.
    pub reconcile_duration: Family<KindLabels, Histogram>,
    /// Watch errors by kind (each watch retries with backoff).
    pub watch_errors: Family<KindLabels, Counter>,
    /// Lists after the first, by kind: a watch that lost its place starts again from a list.
    pub watch_restarts: Family<KindLabels, Counter>,
}

impl ControllerMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = ControllerMetrics {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0])
            }),
            watch_errors: Family::default(),
            watch_restarts: Family::default(),
        };
        let m = &metrics;
        registry.register("reconciles", "Reconciles by kind", m.reconciles.clone());
        let help = "Failed reconciles by kind and error";
        registry.register("reconcile_errors", help, m.reconcile_errors.clone());
        let help = "Time from a change to the end of its reconcile, by kind";
        registry.register(
            "reconcile_duration_seconds",
            help,
            m.reconcile_duration.clone(),
        );
        let help = "Watch errors by kind (the watch retries)";
        registry.register("watch_errors", help, m.watch_errors.clone());
        let help = "Lists after the first, by kind";
        registry.register("watch_restarts", help, m.watch_restarts.clone());
        metrics
    }

    fn kind(kind: &str) -> KindLabels {
        KindLabels {
            kind: kind.to_string(),
        }
    }

    /// Counts one reconcile of `kind` that took `seconds`, and its error if it failed.
    pub fn reconciled(&self, kind: &str, seconds: f64, error: Option<&str>) {
        let labels = Self::kind(kind);
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(seconds);
        if let Some(error) = error {
            self.error(kind, error);
        }
    }

    /// Counts a failure of the controller's work on `kind` outside a reconcile's count (a status
    /// write, queueing a Kubernetes Event).
    pub fn error(&self, kind: &str, error: &str) {
        self.reconcile_errors
            .get_or_create(&KindErrorLabels {
                kind: kind.to_string(),
                error: error.to_string(),
            })
            .inc();
    }

    /// Counts a watch error.
    pub fn watch_error(&self, kind: &str) {
        self.watch_errors.get_or_create(&Self::kind(kind)).inc();
    }

    /// Counts a list after the first.
    pub fn watch_restart(&self, kind: &str) {
        self.watch_restarts.get_or_create(&Self::kind(kind)).inc();
    }
}

/// Rewrites an OpenMetrics exposition as Prometheus text format 0.0.4.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(usize, usize);

    impl WebhookReadiness for Fixed {
        fn count(&self) -> (usize, usize) {
            (self.0, self.1)
        }
    }

    #[test]
    fn webhooks_are_counted_at_scrape_time() {
        let metrics = Metrics::new(Fixed(3, 1));
        let text = metrics.encode();
        assert!(text.contains("# TYPE herald_webhooks gauge"), "{text}");
        assert!(
            text.contains(r#"herald_webhooks{ready="true"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"herald_webhooks{ready="false"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn text_format_names_counters_with_total_and_has_no_eof() {
        let metrics = Metrics::new(Fixed(0, 0));
        metrics.rejected("too_large");
        let text = metrics.encode_prometheus_text();
        assert!(
            text.contains("# TYPE herald_receiver_rejected_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP herald_receiver_rejected_total "),
            "{text}"
        );
        assert!(
            text.contains("herald_receiver_rejected_total{reason=\"too_large\"} 1"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(metrics.encode().ends_with("# EOF\n"));
    }
}
